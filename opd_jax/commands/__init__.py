"""The ``opd-jax`` command line: one module per command (``add_parser``, ``run``), shared flags in
:mod:`opd_jax.commands.flags`. The library never imports this package."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence

from opd_jax import __version__
from opd_jax.commands import demo, eval as evaluate, flags, plan, train, verify

# In the order `opd-jax --help` lists them.
COMMANDS = {"verify": verify, "train": train, "demo": demo, "eval": evaluate, "plan": plan}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-jax",
        description="On-policy distillation with f-divergences: stop-gradient OPD and the unbiased OPD+.",
    )
    parser.add_argument("--version", action="version", version=f"opd-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    flags.apply_config_file(parser, argv)  # --config's flag keys become those flags' defaults
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _url_arguments(args)
    if args.command != "plan":  # plan compiles for TPU topologies on any host: it needs libtpu
        leave_out_tpu_plugin()
    return COMMANDS[args.command].run(args)


def _url_arguments(args: argparse.Namespace) -> None:
    """Path flags given as URLs: ``type=pathlib.Path`` makes ``gs://b/x`` the local path ``gs:/b/x``,
    which a command writing there would create. A ``gs://`` value becomes the URL's path
    (:func:`opd_jax.storage.as_path`), another scheme is refused naming the schemes that work, and a
    local path stays as parsed."""
    from opd_jax import storage
    from opd_jax.errors import InputError

    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if not any(isinstance(v, pathlib.PurePath) for v in values):
            continue
        flag = "--" + name.replace("_", "-")
        try:
            converted = [storage.as_path(v, what=flag) if isinstance(v, pathlib.PurePath) else v for v in values]
        except InputError as error:
            flags.fail(args.command, str(error))
        converted = [c if isinstance(v, pathlib.PurePath) and storage.is_remote(c) else v
                     for v, c in zip(values, converted)]
        if args.command == "demo" and any(storage.is_remote(c) for c in converted if isinstance(c, pathlib.PurePath)):
            flags.fail("demo", f"{flag} {converted[0]}: opd-jax demo writes a local folder; gs:// is for opd-jax "
                               "train's --output")
        setattr(args, name, converted if isinstance(value, list) else converted[0])


# Google's PCI vendor id: a TPU chip shows up under it in sysfs (jax's own TPU detection reads the same).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def host_has_tpu() -> bool:
    """Whether a TPU chip is attached to this host (a PCI device of Google's vendor id)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as handle:
                if handle.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def leave_out_tpu_plugin() -> str | None:
    """On a host without a TPU, start jax without its TPU plugin; returns the platforms chosen.

    The tpu extra installs libtpu for ``opd-jax plan``. jax then tries the TPU backend on every start,
    and on a CPU or GPU host libtpu prints start-up warnings, an ``E0000 ... unexpected worker
    hostname`` line and a source trace that a user can do nothing about. Without a TPU (and when
    the user has not chosen ``JAX_PLATFORMS``) the platforms are set to the others: the GPU's when
    a GPU plugin is installed and a GPU is visible, and the CPU. Errors are untouched. Does nothing
    when ``JAX_PLATFORMS`` is set or the host has a TPU.
    """
    if os.environ.get("JAX_PLATFORMS") or host_has_tpu():
        return None
    platforms = []
    if _plugin_installed("cuda") and glob.glob("/dev/nvidia[0-9]*"):
        platforms.append("cuda")
    if _plugin_installed("rocm") and os.path.exists("/dev/kfd"):
        platforms.append("rocm")
    platforms.append("cpu")
    value = ",".join(platforms)
    os.environ["JAX_PLATFORMS"] = value  # child processes (a multi-process launch, vLLM) inherit it
    if "jax" in sys.modules:  # jax read the variable at import: tell its config too (no backend has started)
        sys.modules["jax"].config.update("jax_platforms", value)
    return value


def _plugin_installed(kind: str) -> bool:
    """A jax GPU plugin (``jax_plugins.xla_cuda12`` …, or the ``jax-cuda*-plugin`` distributions)."""
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(kind in name for path in jax_plugins.__path__ for name in os.listdir(path)
               if importlib.util.find_spec(f"jax_plugins.{name.split('.')[0]}") is not None)

