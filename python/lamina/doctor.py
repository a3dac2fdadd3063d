"""`lamina doctor`: what this machine has, and what lamina uses of it."""
from __future__ import annotations

import argparse

from .system import system_info


def add_cli(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("doctor", help="what this machine has and what lamina uses")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    print(system_info())
    return 0
