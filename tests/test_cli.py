"""One error convention for every tool: a mistake is one line `PROG: error: ...` and exit 2, a failed
piece of work exit 1, never a traceback; every tool has a console script."""

from __future__ import annotations

import configparser
import importlib

import pytest

from helpers import REPO
from restorer.base.cli import run
from restorer.base.errors import RestorerError, RunError, UsageError, one_line

TOOLS = {  # console script -> (module, its one name: in its usage, its errors and warnings, `restorer COMMAND`)
    "restorer-make-shards": ("restorer.tools.make_shards", "restorer make-shards"),
    "restorer-train": ("restorer.train.loop", "restorer train"),
    "restorer-restore": ("restorer.tools.restore", "restorer restore"),
    "restorer-evaluate": ("restorer.tools.evaluate", "restorer evaluate"),
    "restorer-export": ("restorer.tools.export", "restorer export"),
    "restorer-plot": ("restorer.tools.plot", "restorer plot"),
    "restorer-runs": ("restorer.tools.runs", "restorer runs"),
    "restorer-slurm": ("restorer.tools.slurm", "restorer slurm"),
    "restorer-demo": ("restorer.tools.demo", "restorer demo"),
}


def test_every_tool_has_a_console_script():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts == {"restorer": "restorer.__main__:main", **{name: f"{module}:main" for name, (module, _) in TOOLS.items()}}


def test_restorer_help_lists_every_command_and_each_runs_its_tool(capsys):
    from restorer.__main__ import COMMANDS, main

    assert {f"restorer-{name}": module for name, (module, _) in COMMANDS.items()} == {
        name: module for name, (module, _) in TOOLS.items()}
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)
    assert main(["plot", "--no-such-option"]) == 2 and capsys.readouterr().err.startswith("restorer plot: error: ")
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("restorer: error: no command 'no-such-command'") and err.count("\n") == 1


@pytest.mark.parametrize("script", sorted(TOOLS))
def test_a_mistake_in_any_tools_command_is_one_line_and_exit_2(script, capsys):
    module, prog = TOOLS[script]
    main = importlib.import_module(module).main
    assert main(["--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")
    assert prog == "restorer " + script.removeprefix("restorer-")  # the command that runs it


def test_the_runner_says_one_line_with_the_errors_exit_code(capsys):
    def failing(error):
        def body():
            raise error
        return body

    assert run("tool", failing(UsageError("bad\n   option"))) == 2
    assert run("tool", failing(RunError("the work failed"))) == 1
    assert run("tool", failing(FileNotFoundError(2, "No such file or directory", "/x"))) == 2
    assert run("tool", failing(RestorerError("quiet")), quiet=lambda e: True) == 2
    assert run("tool", failing(KeyboardInterrupt())) == 130
    err = capsys.readouterr().err.splitlines()
    assert err == ["tool: error: bad option", "tool: error: the work failed",
                   "tool: error: [Errno 2] No such file or directory: '/x'", "", "tool: interrupted"]
    with pytest.raises(ValueError):  # not the user's: a bug stays a traceback
        run("tool", failing(ValueError("a bug")))
    assert one_line("a " * 400).endswith("...") and len(one_line("a " * 400)) == 300
