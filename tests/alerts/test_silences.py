"""Alertmanager's matcher semantics, the silence form link, and the CLI's parsing."""

from __future__ import annotations

import urllib.parse

import pytest

from alerts.silences import Matcher, Silence, parse_duration, parse_matcher, silence_url

LABELS = {"rule": "ctr_drop", "campaign": "c1", "channel": "social", "scope": "campaign"}


@pytest.mark.parametrize(
    ("matcher", "hit"),
    [
        ("rule=ctr_drop", True),
        ("rule=ctr", False),
        ("rule!=ctr_drop", False),
        ("rule!=other", True),
        ("rule=~ctr_.*", True),
        ("rule=~ctr", False),  # anchored: a partial match is no match
        ("rule=~drop", False),
        ("rule!~ctr_.*", False),
        ("rule!~cpa.*", True),
        ("campaign=~c1|c2", True),  # the alternation is anchored as a whole
        ("campaign=~c|c1x", False),
        ('channel="social"', True),
        ("missing=", True),  # a label the alert lacks is the empty string
        ("missing!=", False),
        ("missing=~.*", True),
        ("missing=~.+", False),
    ],
)
def test_matchers_follow_alertmanager(matcher: str, hit: bool) -> None:
    assert parse_matcher(matcher).matches(LABELS) is hit


def test_a_silence_needs_every_matcher_and_its_time() -> None:
    s = Silence("id", (Matcher("rule", "ctr_drop"), Matcher("campaign", "c2")), 100, 200)
    assert not s.matches(LABELS)
    s = Silence("id", (Matcher("rule", "ctr_drop"), Matcher("campaign", "c1")), 100, 200)
    assert s.matches(LABELS)
    assert [s.active(t) for t in (99, 100, 199.9, 200)] == [False, True, True, False]
    assert not Silence("id", s.matchers, 100, 200, state="expired").active(150)


def test_bad_matchers_and_durations_are_refused() -> None:
    for bad in ("rule", "=x", "1rule=x", "rule=~("):
        with pytest.raises(ValueError):
            parse_matcher(bad)
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400
    for bad in ("", "0m", "2 hours", "-1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_silence_link_prefills_alertmanagers_form() -> None:
    url = silence_url("http://am:9093/", {**LABELS, "empty": "", "odd": 'a"b'})
    base, _, query = url.partition("?")
    assert base == "http://am:9093/#/silences/new"
    (value,) = urllib.parse.parse_qs(query)["filter"]
    assert value == ('{campaign="c1",channel="social",odd="a\\"b",rule="ctr_drop",'
                     'scope="campaign"}')  # fmt: skip
