"""The README as a new user follows it: the quick start's install line run as written into a
fresh venv, then every command of its ``console`` blocks run against that install, each
printing what the README shows.

The README is the interface here: a change to a message it quotes fails this test until the
README shows the new text. A ``console`` block is ``$ COMMAND`` lines, each followed by the
output the README promises; a line ending in `` ...`` promises only its beginning, and log
timestamps match any time. Where the README says Docker Hub, the walk passes flags that point
hubproxy at the fake hub instead, and ``127.0.0.1:5000`` is whatever port it got.

Offline, like the rest of the suite: the venv gets the suite's own dependencies through a
``.pth`` line, and ``pip install .`` runs with ``--no-deps --no-build-isolation --no-index``
on a copy of the package (so the checkout gets no build/ directory). About 20-40 s, most of it
``python -m venv`` installing pip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.conftest import TLSFiles
from tests.fakehub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV = "~/hubproxy-venv"  # the quick start's venv; the walk puts it under tmp_path
README_LISTEN = "http://127.0.0.1:5000"
README_UPSTREAM = "https://registry-1.docker.io"
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@dataclass(frozen=True)
class Step:
    """One ``$ command`` of a console block and the lines the README shows it printing."""

    command: str
    expected: tuple[str, ...]


def fenced_blocks(text: str, language: str) -> list[list[str]]:
    """The lines of every ```language fenced block, in order."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None and line.strip() == f"```{language}":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"a ```{language} block in README.md is never closed"
    return blocks


def console_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    for block in fenced_blocks(text, "console"):
        assert block and block[0].startswith("$ "), f"a console block starts with $: {block}"
        command, expected = "", list[str]()
        for line in block:
            if line.startswith("$ "):
                if command:
                    steps.append(Step(command, tuple(expected)))
                command, expected = line[2:], []
            else:
                expected.append(line)
        steps.append(Step(command, tuple(expected)))
    return steps


def quick_start(text: str) -> list[str]:
    """The commands (not the comments) of the first sh block under "## Quick start"."""
    section = text[text.index("## Quick start\n") :]
    block = fenced_blocks(section, "sh")[0]
    return [line for line in block if line.strip() and not line.lstrip().startswith("#")]


def matches(expected: str, actual: str) -> bool:
    expected, actual = _TIMESTAMP.sub("<time> ", expected), _TIMESTAMP.sub("<time> ", actual)
    if expected.endswith(" ..."):
        return actual.startswith(expected[:-3])
    return actual == expected


def assert_prints(step: Step, actual: list[str]) -> None:
    ok = len(actual) == len(step.expected) and all(
        matches(e, a) for e, a in zip(step.expected, actual, strict=True)
    )
    assert ok, (
        f"README.md shows `{step.command}` printing:\n"
        + "\n".join(step.expected)
        + "\nbut it prints:\n"
        + "\n".join(actual)
    )


def test_quick_start_keeps_its_two_commands() -> None:
    """The README opens with the run command and the test command; CI runs the latter."""
    commands = quick_start(README.read_text())
    assert commands == [
        f"python3 -m venv {VENV} && {VENV}/bin/pip install . && {VENV}/bin/hubproxy",
        "bash tests/run.sh",
    ]
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_python_version_is_the_package_one() -> None:
    """The README's "Python 3.11 or newer" is pyproject's requires-python."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in pyproject
    assert "**Python 3.11\nor newer**" in README.read_text()


def _copy_package(destination: Path) -> None:
    """What ``pip install .`` reads from the checkout, without the checkout's build output."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    shutil.copytree(
        ROOT / "hubproxy", destination / "hubproxy", ignore=shutil.ignore_patterns("__pycache__")
    )


async def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    result = await trio.run_process(
        argv, cwd=cwd, env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_readme_walk_on_a_fresh_venv(
    hub: FakeHub, tls_files: TLSFiles, tmp_path: Path
) -> None:
    text = README.read_text()
    home = tmp_path / "home"
    home.mkdir()
    venv = home / "hubproxy-venv"
    # hubproxy's default cache is under $XDG_CACHE_HOME (or ~/.cache): keep it in tmp_path
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("PYTHONPATH", None)
    install, _ = quick_start(text)
    make_venv, pip_install, run = install.split(" && ")

    with trio.fail_after(180):
        # python3 -m venv ~/hubproxy-venv: this interpreter stands in for python3
        assert make_venv == f"python3 -m venv {VENV}"
        code, out, err = await _run([sys.executable, "-m", "venv", str(venv)], home, env)
        assert code == 0, err
        code, out, err = await _run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            home,
            env,
        )
        assert code == 0, err
        site = Path(out.strip())
        # the dependencies (trio, h11) and wheel from the suite's environment: no network
        (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

        # ~/hubproxy-venv/bin/pip install . (in the checkout)
        assert pip_install == f"{VENV}/bin/pip install ."
        checkout = tmp_path / "checkout"
        _copy_package(checkout)
        offline = [
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
        ]
        code, out, err = await _run(
            [str(venv / "bin" / "pip"), "install", *offline, "."], checkout, env
        )
        assert code == 0, err
        # the installed package, not the checkout, with its data files
        code, out, err = await _run(
            [str(venv / "bin" / "python"), "-c", "import hubproxy; print(hubproxy.__file__)"],
            home,
            env,
        )
        installed = Path(out.strip()).parent
        assert installed.is_relative_to(venv), out
        for data in ("hubproxy.service", "hubproxy.init", "hubproxy.toml", "make-self-signed.sh"):
            assert (installed / "service" / data).is_file(), data

        # ~/hubproxy-venv/bin/hubproxy --help: "lists every flag"
        hubproxy = str(venv / "bin" / "hubproxy")
        code, out, err = await _run([hubproxy, "--help"], home, env)
        assert code == 0 and out.startswith("usage: hubproxy"), err
        assert "--listen" in out and "--cache-size" in out

        assert run == f"{VENV}/bin/hubproxy"
        server: trio.Process | None = None
        listen = ""
        try:
            for step in console_steps(text):
                argv = shlex.split(step.command.replace(VENV, str(venv)))
                if argv[0] in ("hubproxy", hubproxy):
                    argv[0] = hubproxy
                    if argv[1:]:
                        code, out, err = await _run(argv, home, env)
                        assert code == 0, err
                        assert_prints(step, (out + err).splitlines())
                        continue
                    # the quick start's server, with the fake hub where it says Docker Hub
                    assert server is None, "the README starts hubproxy twice"
                    argv += ["--listen", "127.0.0.1:0", "--upstream", hub.registry_url]
                    argv += ["--upstream-ca", str(tls_files.ca_pem)]
                    server = await trio.lowlevel.open_process(
                        argv, cwd=home, env=env, stderr=subprocess.PIPE
                    )
                    first = await _first_line(server)
                    found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
                    assert found, first
                    listen = found.group(1)
                    shown = first.replace(listen, README_LISTEN).replace(
                        hub.registry_url, README_UPSTREAM
                    )
                    assert_prints(step, [shown])
                elif argv[:2] == ["curl", "-fsS"] and len(argv) == 3:
                    assert server is not None, f"`{step.command}` before hubproxy was started"
                    url = argv[2].replace(README_LISTEN, listen)
                    body = await trio.to_thread.run_sync(_get, url)
                    assert_prints(step, body.splitlines())
                else:
                    pytest.fail(
                        f"README.md console command not walked by this test: {step.command}"
                    )
            assert server is not None, "the README never shows hubproxy starting"
        finally:
            if server is not None:
                server.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    await server.wait()
                if server.returncode is None:
                    server.kill()
                    await server.wait()
                assert server.stderr is not None
                await server.stderr.aclose()


async def _first_line(process: trio.Process) -> str:
    assert process.stderr is not None
    seen = b""
    while b"\n" not in seen:
        chunk = await process.stderr.receive_some(65536)
        assert chunk, f"hubproxy exited before its startup line: {seen.decode()}"
        seen += chunk
    return seen.split(b"\n", 1)[0].decode()


def _get(url: str) -> str:
    """``curl -fsS URL``: the body of a 2xx answer (no proxy from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        assert 200 <= response.status < 300
        return str(response.read().decode())
