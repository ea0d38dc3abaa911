"""Bash tab completion for `python -m vpt_dml.run` (config groups, keys, options).

Hydra's own script (`-sc install=bash`) completes `python FILE.py` or an installed
command, never `python -m MODULE`: it takes the word after `python` for a file and gives
up on `-m`. `eval "$(python -m vpt_dml.run -sc install=bash)"` installs the script below
instead (run.py hands `-sc install=bash` / `uninstall=bash` here). It completes
`python -m vpt_dml.run ...` (python3 and a venv's python too), and leaves every other
python command to the shell's default (file names).

Each TAB asks this module, not vpt_dml.run: composing the config needs Hydra only, and
importing the training stack (torch, Lightning) would take seconds per TAB.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

SCRIPT = r"""_vpt_dml_run_complete()
{
    local words=($COMP_LINE)
    if [[ "${words[1]}" != "-m" || "${words[2]}" != "vpt_dml.run" ]]; then
        return 0
    fi
    # Hydra strips the first word of the line it completes: give it the module's name
    local line="vpt_dml.run${COMP_LINE#*vpt_dml.run}"
    local choices
    choices=$(COMP_LINE="$line" "${words[0]}" -m vpt_dml.runs.completion -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "${COMP_WORDS[COMP_CWORD]}"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _vpt_dml_run_complete python python3
"""
UNINSTALL = "complete -r python python3 2>/dev/null; unset -f _vpt_dml_run_complete\n"
FLAGS = ("-sc", "--shell-completion")


def requested(argv: list[str]) -> str | None:
    """The completion script `argv` asks for ("install" / "uninstall"), else None."""
    for flag, value in zip(argv, argv[1:]):
        if flag in FLAGS and value in ("install=bash", "uninstall=bash"):
            return value.split("=")[0]
    return None


def script(action: str) -> str:
    return SCRIPT if action == "install" else UNINSTALL


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def _query(cfg: DictConfig) -> None:
    # only `-sc query=bash` (which Hydra answers before calling this) belongs here
    print("error: python -m vpt_dml.runs.completion only answers tab completion; run "
          "python -m vpt_dml.run", file=sys.stderr)  # fmt: skip
    sys.exit(2)


if __name__ == "__main__":
    action = requested(sys.argv[1:])
    if action:
        print(script(action), end="")
    else:
        _query()
