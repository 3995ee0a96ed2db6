"""The nginx adapter's edit: one server line changes, byte for byte, nothing else."""

from __future__ import annotations

import pytest

from compose_rollout.errors import LoadBalancerError
from compose_rollout.lb.connections import ss_argv
from compose_rollout.lb.nginx import server_lines, with_down, with_server_added, with_server_renamed, without_server

CONF = """\
# managed by hand; compose-rollout edits only the server lines of `upstream app`
upstream other {
    server 10.0.1.1:8080;   # not ours
}

upstream app {
    least_conn;
    server 10.0.1.1:8080 max_fails=3 fail_timeout=5s;  # app-1 { not a brace
    server 10.0.1.2:8080;
	server [fd00::3]:8080 weight=2 ;
    # server 10.0.1.9:8080;  a commented-out line is no server
}

server {
    listen 80;
    location / { proxy_pass http://app; add_header X-Note "upstream app { server 10.0.1.2:8080 down; }"; }
}
"""


def test_the_servers_of_the_named_upstream_only() -> None:
    lines = server_lines(CONF, "app", "f")
    assert sorted(lines) == ["10.0.1.1:8080", "10.0.1.2:8080", "[fd00::3]:8080"]
    assert not any(line.down for line in lines.values())


@pytest.mark.parametrize("address", ["10.0.1.1:8080", "10.0.1.2:8080", "[fd00::3]:8080"])
def test_drain_changes_only_that_line_and_ready_restores_the_bytes(address: str) -> None:
    drained = with_down(CONF, "app", address, True, "f")
    changed = [(a, b) for a, b in zip(CONF.splitlines(), drained.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and address in changed[0][1] and " down" in changed[0][1]
    assert server_lines(drained, "app", "f")[address].down
    assert server_lines(drained, "other", "f")["10.0.1.1:8080"].down is False
    assert with_down(drained, "app", address, False, "f") == CONF


def test_a_line_already_down_is_left_as_it_is() -> None:
    drained = with_down(CONF, "app", "10.0.1.2:8080", True, "f")
    assert with_down(drained, "app", "10.0.1.2:8080", True, "f") == drained


def test_a_server_not_in_the_upstream_is_refused_naming_it() -> None:
    with pytest.raises(LoadBalancerError, match=r"f: `upstream app` has no `server 10.0.1.9:8080` line"):
        with_down(CONF, "app", "10.0.1.9:8080", True, "f")


def test_a_missing_or_twice_defined_upstream_is_refused() -> None:
    with pytest.raises(LoadBalancerError, match="f has no `upstream web` block"):
        server_lines(CONF, "web", "f")
    with pytest.raises(LoadBalancerError, match="f has 2 `upstream other` blocks"):
        server_lines(CONF + "upstream other { server 10.0.2.1:80; }\n", "other", "f")


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """(lines only in before, lines only in after)."""
    old, new = before.splitlines(), after.splitlines()
    return [line for line in old if line not in new], [line for line in new if line not in old]


def test_a_surge_server_is_added_down_after_its_neighbour_with_its_parameters() -> None:
    added = with_server_added(CONF, "app", "10.0.1.1:8080", "10.0.1.1:8081", "f")
    assert changed_lines(CONF, added) == (
        [],
        ["    server 10.0.1.1:8081 max_fails=3 fail_timeout=5s down;"],
    )
    lines = added.splitlines()
    assert lines.index("    server 10.0.1.1:8081 max_fails=3 fail_timeout=5s down;") == 1 + next(
        i for i, line in enumerate(lines) if "10.0.1.1:8080 max_fails" in line
    )
    assert server_lines(added, "app", "f")["10.0.1.1:8081"].down
    assert with_server_added(added, "app", "10.0.1.1:8080", "10.0.1.1:8081", "f") == added  # once only
    ipv6 = with_server_added(CONF, "app", "[fd00::3]:8080", "[fd00::3]:8081", "f")
    assert changed_lines(CONF, ipv6)[1] == ["\tserver [fd00::3]:8081 weight=2 down ;"]


def test_a_moved_server_keeps_its_line_and_parameters_with_the_new_address() -> None:
    moved = with_server_renamed(CONF, "app", "10.0.1.1:8080", "10.0.1.1:8081", "f")
    assert changed_lines(CONF, moved) == (
        ["    server 10.0.1.1:8080 max_fails=3 fail_timeout=5s;  # app-1 { not a brace"],
        ["    server 10.0.1.1:8081 max_fails=3 fail_timeout=5s;  # app-1 { not a brace"],
    )
    assert server_lines(moved, "other", "f") == server_lines(CONF, "other", "f")


def test_a_removed_server_takes_its_whole_line_and_nothing_else() -> None:
    removed = without_server(CONF, "app", "10.0.1.2:8080", "f")
    assert changed_lines(CONF, removed) == (["    server 10.0.1.2:8080;"], [])
    assert len(removed.splitlines()) == len(CONF.splitlines()) - 1
    commented = without_server(CONF, "app", "10.0.1.1:8080", "f")  # its comment was about it
    assert "app-1" not in commented and sorted(server_lines(commented, "app", "f")) == [
        "10.0.1.2:8080",
        "[fd00::3]:8080",
    ]
    with pytest.raises(LoadBalancerError, match=r"has no `server 10\.0\.1\.9:8080` line"):
        without_server(CONF, "app", "10.0.1.9:8080", "f")


def test_ss_gets_the_address_as_one_argument() -> None:
    assert ss_argv("10.0.1.2:8080") == ["ss", "-H", "-t", "-n", "state", "established", "dst", "10.0.1.2:8080"]
    assert ss_argv("[fd00::3]:8080")[-1] == "[fd00::3]:8080"
    with pytest.raises(LoadBalancerError):
        ss_argv("10.0.1.2:8080;reboot")
