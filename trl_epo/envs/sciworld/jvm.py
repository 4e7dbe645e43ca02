"""The ScienceWorld simulator's Java virtual machine: finding `java`, starting one lean JVM, telling when it died.

The `scienceworld` package starts its JVM with py4j's `launch_gateway` and no JVM options. `ScienceWorldJVM` does the
same with lean options (``-Xmx512m -XX:+UseSerialGC -XX:ActiveProcessorCount=1`` cut the resident memory from
~2.5 GB to ~0.45 GB) and without the package's py4j callback server, which the simulator never calls.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence

from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
from scienceworld.constants import BASEPATH as SCIENCEWORLD_DIR
from scienceworld.constants import JAR_PATH


DEFAULT_JAVA_OPTIONS = ("-Xmx512m", "-XX:+UseSerialGC", "-XX:ActiveProcessorCount=1")
# How long a simulator call that failed on the connection waits for the JVM to exit before it says "the JVM died".
# A killed JVM closes its sockets before the kernel lets its parent reap it (all of its threads must exit first), so
# the first sign of its death is often the failed call itself, a few milliseconds before `poll()` can see it.
JVM_EXIT_GRACE_SECONDS = 5.0

JAVA_INSTALL_HINT = (
    "ScienceWorld runs its simulator in a Java virtual machine, and no `java` executable was found{where}. Install a "
    "Java runtime >= 11, e.g. `apt-get install -y openjdk-17-jre-headless` (Debian/Ubuntu), `conda install -c "
    "conda-forge openjdk=17` or `brew install openjdk@17`; then put `java` on PATH or set JAVA_HOME to the install "
    "directory (or pass java_path= to ScienceWorldEnv)."
)


class JavaNotFoundError(RuntimeError):
    """No Java runtime to run the ScienceWorld simulator (the message says how to install one)."""


class JVMDiedError(RuntimeError):
    """The simulator's JVM exited (killed, out of memory, crashed): its episode is lost; a reset starts a new JVM."""


def find_java(java_path: str | None = None) -> str:
    """The `java` executable to use: `java_path` if given, else ``$JAVA_HOME/bin/java``, else `java` on PATH.

    Raises `JavaNotFoundError` (saying how to install Java) when there is none.
    """
    if java_path:
        resolved = shutil.which(java_path)
        if resolved is None:
            raise JavaNotFoundError(JAVA_INSTALL_HINT.format(where=f" at java_path={java_path!r}"))
        return resolved
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = os.path.join(java_home, "bin", "java")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    resolved = shutil.which("java")
    if resolved is None:
        where = f" (JAVA_HOME={java_home!r} has no bin/java, and none is on PATH)" if java_home else " on PATH"
        raise JavaNotFoundError(JAVA_INSTALL_HINT.format(where=where))
    return resolved


def check_java(java_path: str | None = None) -> str:
    """Fail fast, with install instructions, when Java is missing; returns the `java` executable."""
    return find_java(java_path)


class ScienceWorldJVM:
    """One ScienceWorld simulator in its own JVM, reached through py4j (`server` is the simulator's Python API).

    The JVM reads its stdin (py4j's ``--die-on-broken-pipe``), so it exits when this process dies; it stays in this
    process's process group, so `EnvPool` kills it together with its worker.
    """

    def __init__(
        self,
        java_options: Sequence[str] = DEFAULT_JAVA_OPTIONS,
        java_path: str | None = None,
        jar_path: str | None = None,
    ):
        self.java = find_java(java_path)
        self.java_options = tuple(java_options)
        jar = jar_path or JAR_PATH
        try:
            port, self.process = launch_gateway(
                classpath=jar,
                javaopts=list(self.java_options),
                java_path=self.java,
                die_on_exit=True,
                cwd=SCIENCEWORLD_DIR,
                return_proc=True,
            )
        except Exception as error:  # the JVM did not start (bad options, broken install, too old a Java)
            raise RuntimeError(
                f"Could not start the ScienceWorld JVM ({self.java} with options {list(self.java_options)}, jar "
                f"{jar}): {type(error).__name__}: {error}. Check `{self.java} -version` (Java >= 11 is needed) and the "
                "java_options."
            ) from error
        self._gateway = JavaGateway(
            gateway_parameters=GatewayParameters(port=port, auto_field=True), java_process=self.process
        )
        self.server = self._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """False once the JVM has exited and been reaped (a JVM being killed may still count as alive briefly)."""
        return self.process.poll() is None

    def exited_within(self, timeout: float) -> bool:
        """Whether the JVM exits within `timeout` seconds (it is reaped then). Used after a failed call, to tell a
        dead JVM from a live one that answered badly."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def exit_description(self) -> str:
        """How the JVM ended, e.g. "killed by signal 9" (empty while it runs)."""
        code = self.process.returncode
        if code is None:
            return ""
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self, timeout: float = 5.0) -> None:
        """Stop the JVM (idempotent); it is killed if it does not exit within `timeout` seconds."""
        # Best effort throughout: a JVM that is already gone makes py4j and the pipe raise, which changes nothing here.
        if self.process.poll() is not None:
            with contextlib.suppress(Exception):
                self._gateway.close()
            return
        with contextlib.suppress(Exception):
            self._gateway.shutdown()
        with contextlib.suppress(OSError):  # closing stdin makes a --die-on-broken-pipe gateway exit
            self.process.stdin.close()
        if not self.exited_within(timeout):
            self.process.kill()
            self.process.wait(timeout=timeout)
