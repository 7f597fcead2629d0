"""Sizing the worker fleet from the queue: a pure policy, actuators by URL, a control loop, a simulator."""
