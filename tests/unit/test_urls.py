"""URL parsing shared by every backend's ``from_url``."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdasync.errors import ConfigError
from sdasync.urls import path_from_url, query_params, url_for_path


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:///data/sdasync.db", Path("data/sdasync.db")),
    ("sqlite:////var/lib/sdasync/sdasync.db", Path("/var/lib/sdasync/sdasync.db")),
    ("file:///results", Path("results")),
    ("file:////srv/results/", Path("/srv/results")),
    ("sqlite:///data/q.db?name=tasks", Path("data/q.db")),
])
def test_three_slashes_are_relative_four_absolute(url: str, path: Path) -> None:
    assert path_from_url(url) == path
    assert path_from_url(url).is_absolute() == path.is_absolute()


@pytest.mark.parametrize("url", ["sqlite://host/data.db", "file://results", "sqlite://", "sqlite:///", "file:"])
def test_urls_without_a_usable_path_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        path_from_url(url)


@pytest.mark.parametrize("path", [Path("data/sdasync.db"), Path("/var/lib/sdasync.db"), "rel/x"])
def test_url_for_path_is_the_inverse_of_path_from_url(path: Path | str) -> None:
    url = url_for_path("sqlite", path)

    assert url.startswith("sqlite:///")
    assert path_from_url(url) == Path(path)


def test_url_for_an_absolute_path_has_four_slashes() -> None:
    assert url_for_path("file", Path("/srv/results")) == "file:////srv/results"


def test_query_params_are_typed() -> None:
    url = "sqlite:///q.db?name=jobs&max_receives=5&visibility_timeout=1.5&fsync=no"
    allowed = {"name": str, "max_receives": int, "visibility_timeout": float, "fsync": bool}

    assert query_params(url, allowed) == {"name": "jobs", "max_receives": 5, "visibility_timeout": 1.5,
                                          "fsync": False}
    assert query_params("sqlite:///q.db", allowed) == {}


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("Yes", True), ("on", True),
                                            ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_booleans_accept_the_usual_spellings(raw: str, value: bool) -> None:
    assert query_params(f"fake://?flag={raw}", {"flag": bool}) == {"flag": value}


def test_an_unknown_parameter_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown parameter 'nmae'.*valid: max_receives, name"):
        query_params("sqlite:///q.db?nmae=x", {"name": str, "max_receives": int})


def test_a_url_that_takes_no_parameters_says_so() -> None:
    with pytest.raises(ConfigError, match="valid: none"):
        query_params("file:///results?x=1", {})


@pytest.mark.parametrize("query", ["max_receives=ten", "visibility_timeout=", "flag=maybe"])
def test_a_malformed_value_is_a_config_error(query: str) -> None:
    with pytest.raises(ConfigError, match="parameter"):
        query_params(f"sqlite:///q.db?{query}", {"max_receives": int, "visibility_timeout": float, "flag": bool})
