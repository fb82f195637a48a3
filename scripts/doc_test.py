#!/usr/bin/env python3
"""Runs the documentation's commands, so that what README.md and docs/ tell a reader to type works.

Every fenced block whose info string carries the word `test` is run, in order, file by file:
```sh test``` with bash (-euo pipefail), ```python test``` with $DOC_PYTHON, ```js test``` with
node as an ES module; each from the repository root, within 120 s, and must exit 0. A block
marked ```sh serve``` is the file's server command, started in the background before its test
blocks (and stopped after them); a file with test blocks and no serve block gets README.md's. The server must log its readiness line within 120 s.

What is replaced, and nothing else: `cargo run --release --` becomes the binary cargo test built
($BATCHGEN_BIN, default target/debug/batchgen; the command is the same, the build is not repeated),
and that binary's directory and $DOC_PATH (the client venv, for grpcurl) lead PATH, so `batchgen ...`
runs it too.

    scripts/doc_test.py [FILE.md ...]     (default: README.md docs/*.md)
"""
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.environ.get("BATCHGEN_BIN", os.path.join(ROOT, "target", "debug", "batchgen"))
PYTHON = os.environ.get("DOC_PYTHON", sys.executable)
FENCE = re.compile(r"^```(\w+)((?:[ \t]+\w+)*)[ \t]*$")


def blocks(path):
    """(line, language, tags, text) of every fenced block of the file."""
    out, current = [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if current is None:
                m = FENCE.match(line)
                if m:
                    current = (n, m.group(1), m.group(2).split(), [])
                elif line.startswith("```"):
                    current = (n, "", [], [])
            elif line.startswith("```"):
                out.append((current[0], current[1], current[2], "\n".join(current[3]) + "\n"))
                current = None
            else:
                current[3].append(line)
    return out


def command(text):
    return text.replace("cargo run --release --", "batchgen")


def env():
    e = dict(os.environ)
    extra = [os.path.dirname(os.path.abspath(BIN))] + [p for p in os.environ.get("DOC_PATH", "").split(":") if p]
    e["PATH"] = ":".join(extra + [e.get("PATH", "")])
    return e


class Server:
    def __init__(self, text, where):
        self.log = tempfile.NamedTemporaryFile(prefix="doc-test-server-", suffix=".log", delete=False)
        self.where = where
        self.proc = subprocess.Popen(["bash", "-c", "exec " + command(text).strip()], cwd=ROOT, env=env(),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while True:
            log = open(self.log.name, encoding="utf-8", errors="replace").read()
            if re.search(r"ready in [0-9.]+ s: serving", log):
                return
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"{where}: the server did not get ready:\n{log}")
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run(language, text, where):
    if language in ("sh", "bash"):
        argv, stdin = ["bash", "-euo", "pipefail", "-c", command(text)], None
    elif language == "python":
        argv, stdin = [PYTHON, "-"], text
    elif language in ("js", "javascript"):
        argv, stdin = ["node", "--input-type=module", "-"], text
    else:
        sys.exit(f"{where}: no runner for ```{language} test")
    started = time.time()
    try:
        done = subprocess.run(argv, input=stdin, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"{where}: did not finish within 120 s"
    output = (done.stdout + done.stderr).strip()
    shown = output if len(output) < 2000 else output[:1000] + "\n...\n" + output[-1000:]
    print(f"--- {where} ({language}, {time.time() - started:.1f} s, exit {done.returncode})\n{shown}")
    return None if done.returncode == 0 else f"{where}: exit status {done.returncode}"


def main():
    files = sys.argv[1:] or [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    failures, ran = [], 0
    for path in files:
        name = os.path.relpath(path, ROOT)
        found = blocks(path)
        tests = [b for b in found if "test" in b[2]]
        if not tests:
            continue
        serve = [b for b in found if "serve" in b[2]]
        if len(serve) > 1:
            sys.exit(f"{name}: more than one ```sh serve block")
        if not serve:
            serve = [b for b in blocks(os.path.join(ROOT, "README.md")) if "serve" in b[2]]
            name_of_serve = "README.md"
        else:
            name_of_serve = name
        if len(serve) != 1:
            sys.exit("README.md: no ```sh serve block (the server the docs' examples call)")
        server = Server(serve[0][3], f"{name_of_serve}:{serve[0][0]}")
        try:
            for line, language, _, text in tests:
                ran += 1
                failure = run(language, text, f"{name}:{line}")
                if failure:
                    failures.append(failure)
        finally:
            server.stop()
    print(f"doc test: {ran} blocks run, {len(failures)} failed")
    if ran == 0:
        sys.exit("doc test: no ```... test blocks found")
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()
