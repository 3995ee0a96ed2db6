"""Run the peers users would pick instead of compose-rollout, against the same test bed.

Both get exactly what compose-rollout gets: the bed's SSH key and pinned host keys
(host keys checked), HAProxy's admin socket, each instance's compose project and
health URL. Both are bounded by a timeout here and by bounded waits inside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from compose_rollout.testbed import Testbed

BASELINES = Path(__file__).resolve().parent / "baselines"
SHELL_SCRIPT = BASELINES / "seed_procedure.sh"
PLAYBOOK = BASELINES / "rollout.yml"


@dataclass(frozen=True)
class PeerOutcome:
    """How a peer's process ended."""

    ok: bool
    exit_code: int
    output_tail: str


def _run(argv: list[str], env: dict[str, str], timeout: float) -> PeerOutcome:
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        return PeerOutcome(False, -1, f"timed out after {timeout} s\n{out[-1500:]}")
    return PeerOutcome(done.returncode == 0, done.returncode, (done.stdout + done.stderr)[-1500:])


def shell_available() -> str | None:
    """None if the shell peer can run here, else what is missing."""
    missing = [tool for tool in ("bash", "socat", "curl", "ssh", "awk") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (apt-get install socat curl openssh-client)" if missing else None


def run_shell_script(bed: Testbed, image: str, timeout: float = 600) -> PeerOutcome:
    """The hand-written seed procedure (bench/baselines/seed_procedure.sh)."""
    with tempfile.TemporaryDirectory(prefix="bench-shell-") as tmp:
        hosts = Path(tmp) / "hosts"
        hosts.write_text(
            "".join(
                f"{i.lb_server} {i.address} {i.ssh_port} {i.project_directory} {i.health_url}\n" for i in bed.instances
            )
        )
        env = dict(
            os.environ,
            LB_SOCKET=str(bed.lb_admin_unix_socket),
            LB_BACKEND=bed.lb_backend,
            SSH_KEY=str(bed.ssh_key_file),
            KNOWN_HOSTS=str(bed.known_hosts_file),
        )
        return _run(["bash", str(SHELL_SCRIPT), str(hosts), image], env, timeout)


def ansible_playbook() -> str | None:
    """Path of ansible-playbook (beside this Python first), or None."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.exists():
        return str(beside)
    return shutil.which("ansible-playbook")


def ansible_available() -> str | None:
    """None if the Ansible peer can run here, else what is missing."""
    playbook = ansible_playbook()
    if playbook is None:
        return "ansible-playbook not found (pip install ansible: it bundles community.general; ansible-core does not)"
    galaxy = Path(playbook).with_name("ansible-galaxy")
    listed = subprocess.run(
        [str(galaxy), "collection", "list", "community.general"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "community.general" not in listed.stdout:
        return "the community.general collection is missing (pip install ansible)"
    return None


def run_ansible(bed: Testbed, image: str, timeout: float = 900) -> PeerOutcome:
    """bench/baselines/rollout.yml with an inventory of the bed's instances."""
    playbook = ansible_playbook()
    if playbook is None:
        return PeerOutcome(False, -1, "ansible-playbook not found")
    with tempfile.TemporaryDirectory(prefix="bench-ansible-") as tmp:
        work = Path(tmp)
        inventory = {
            "fleet": {
                "hosts": {
                    i.name: {
                        "ansible_host": i.address,
                        "ansible_port": i.ssh_port,
                        "lb_server": i.lb_server,
                        "project_directory": str(i.project_directory),
                        "health_url": i.health_url,
                    }
                    for i in bed.instances
                },
                "vars": {
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(bed.ssh_key_file),
                    "ansible_ssh_common_args": f"-o UserKnownHostsFile={bed.known_hosts_file}",
                    "ansible_python_interpreter": "/usr/bin/python3",
                },
            }
        }
        (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
        control = work / "cp"
        control.mkdir()
        env = dict(
            os.environ,
            ANSIBLE_HOME=str(work / "home"),
            ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
            ANSIBLE_HOST_KEY_CHECKING="True",
            # The usual speed settings of a tuned setup: pipelining and SSH connection reuse.
            ANSIBLE_PIPELINING="True",
            ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=60s",
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(control),
            ANSIBLE_RETRY_FILES_ENABLED="False",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_PYTHON_INTERPRETER="auto_silent",
        )
        env["PATH"] = f"{Path(playbook).parent}{os.pathsep}{env.get('PATH', '')}"
        argv = [
            playbook,
            "-i",
            str(work / "inventory.yml"),
            str(PLAYBOOK),
            "-e",
            f"image={image}",
            "-e",
            f"lb_socket={bed.lb_admin_unix_socket}",
            "-e",
            f"lb_backend={bed.lb_backend}",
        ]
        try:
            return _run(argv, env, timeout)
        finally:
            # Close the persistent SSH masters now rather than 60 s later, so they do
            # not linger into the next measurement.
            for socket_path in control.iterdir():
                subprocess.run(
                    ["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "x"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
