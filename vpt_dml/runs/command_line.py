"""The command line of `python -m vpt_dml.run`, checked before Hydra parses it.

`check_command_line(argv)` answers in one line what Hydra itself answers with a traceback
or a parser dump: a config group set to null (`callbacks=null`) and non-ASCII characters
outside quotes (a path such as `outputs/über`). Light on purpose (no torch): it runs
before anything else. `one_line` words a config error as the command prints it.
"""

from __future__ import annotations

from pathlib import Path

from hydra.errors import InstantiationException

from vpt_dml.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def config_groups(conf: Path = CONF_DIR) -> dict[str, list[str]]:
    """Config group (e.g. `callbacks`, `model/peft`) -> its option names."""
    groups = {}
    for folder in sorted(p for p in conf.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[str(folder.relative_to(conf))] = options
    return groups


NO_GROUP_FIX = {
    "callbacks": "callbacks=none runs without the optional callbacks (no checkpoints, images "
    "or progress lines), ~callbacks.NAME drops one (e.g. ~callbacks.dashboard)",
    "logger": "logger=none runs without loggers (no csv/metrics.csv); metrics.json is still written",
}


def check_command_line(argv: list[str]) -> None:
    """Raise a one-line UserError for an override Hydra would answer with a traceback."""
    groups = config_groups()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if value.strip() in ("null", "~", "None") and group in groups:
            fix = NO_GROUP_FIX.get(group) or f"pick one of {', '.join(groups[group])}"
            raise UserError(f"{arg}: a config group takes an option name, not null; {fix}")
        if not _ascii_outside_quotes(arg):
            raise UserError(
                f"{arg}: Hydra reads characters other than ASCII only inside quotes; quote the "
                f"value for Hydra inside the shell's quotes: \"{key}='{value}'\""
            )


def _ascii_outside_quotes(text: str) -> bool:
    quote = None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ord(ch) > 127:
            return False
    return True


def one_line(e: Exception) -> str:
    """The message of a config error, as one line."""
    if isinstance(e, InstantiationException):
        if isinstance(e.__cause__, UserError):
            return str(e.__cause__)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        key = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None
        )
        cause = " ".join(line for line in lines[1:] if not line.startswith("full_key:"))
        where = f"the {key} settings" if key else "a config node"
        return (
            f"{where} were refused: {cause or lines[0]}; fix the overrides of {key or 'that node'}"
        )
    return " ".join(str(e).split("\n"))
