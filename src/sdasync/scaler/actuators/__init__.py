"""Fleet actuators: what the scaler turns to change how many workers run. Opened by URL through the registry's
``fleet`` role: ``spotfleet://<request id>``, ``asg://<group name>``, ``local://?max=N``."""
