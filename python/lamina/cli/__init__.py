"""The `lamina` command: run, chat, bench, info, config, doctor."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any, Sequence

from .. import tools
from .._core import PACKAGE_DIR
from . import bench, doctor
from .args import add_model_args, add_sampling_args, add_thread_args, config_from_args, load_model, ngl
from ..errors import LaminaError
from ..model import Model


def _generate_kwargs(model: Model, n_predict: int) -> dict[str, Any]:
    assert model.config is not None
    return {"max_tokens": n_predict, **model.config.generate_kwargs()}


def cmd_run(args: argparse.Namespace) -> int:
    model = load_model(args)
    ctx = model.context()
    kw = _generate_kwargs(model, 128)
    gen = ctx.generate(args.prompt, **kw)
    if args.echo:
        sys.stdout.write(args.prompt)
    for piece in gen:
        print(piece, end="", flush=True)
    sys.stdout.write("\n")
    s, smp = gen.stats, kw["sampler"]
    how = "greedy" if smp.temperature == 0 else f"temperature {smp.temperature:g}, seed {smp.seed}"
    print(f"[{s['finish_reason']}] prompt: {s['n_prompt']} tokens ({s['n_prompt_eval']} evaluated, "
          f"{s['prompt_tokens_per_s']:.1f} t/s); generated: {s['n_generated']} tokens, {s['tokens_per_s']:.1f} t/s; "
          f"{how}; threads: {ctx.threads_config.describe()}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = load_model(args)
    ctx = model.context()
    kw = _generate_kwargs(model, 512)
    assert model.config is not None
    template = args.template if args.template is not None else model.config["chat_template"]
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    model.apply_chat_template(messages + [{"role": "user", "content": "hi"}], template=template)  # fail early
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        with ctx.chat(messages, template=template, stream=True, **kw) as replies:
            for delta in replies:  # thinking, where the template separates it, goes to stderr
                if delta.reasoning_content:
                    print(delta.reasoning_content, end="", flush=True, file=sys.stderr)
                print(delta.content, end="", flush=True)
            sys.stdout.write("\n")
            messages.append(replies.result().message.openai())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = load_model(args)
    for k, v in vars(model.info).items():
        if k == "chat_template" and v:
            v = f"<{len(v)} chars>"
        print(f"{k:14} {v}")
    print(model.offload)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """show: every effective value and its source. check: exit 1 on an error (bad value, bad YAML,
    missing file), and with --strict on unknown or unsupported keys too; 0 otherwise."""
    action = args.action
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = config_from_args(args, strict=args.strict)
            if action == "check":
                cfg.grammar()  # a bad schema fails here, not at the first generation
        except (ValueError, OSError) as exc:
            print(f"lamina config {action}: error: {exc}", file=sys.stderr)
            return 1
    if action == "show":  # the warnings are in the explanation
        print(cfg.explain())
        return 0
    for w in caught:  # the action is check: show returned above
        print(f"lamina config {action}: warning: {w.message}", file=sys.stderr)
    print(f"{args.config}: ok ({len(caught)} warning{'s' if len(caught) != 1 else ''})")
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_rpc_server(args: argparse.Namespace) -> int:
    """ggml-rpc-server from this package's build: its protocol version is the one lamina speaks."""
    if tools.path("ggml-rpc-server") is None:
        print("lamina rpc-server: this lamina has no ggml-rpc-server (built with -DGGML_RPC=OFF or "
              "LAMINA_BUILD_TOOLS=OFF)", file=sys.stderr)
        return 2
    if not _loopback(args.host):
        print(f"lamina rpc-server: WARNING: ggml's RPC protocol has no authentication and no encryption: anyone who "
              f"can reach {args.host}:{args.port} can run computations on this machine's devices and read what they "
              "hold. Use it only on a trusted network.", file=sys.stderr)
    argv = ["-H", args.host, "-p", str(args.port)]
    if args.device:
        argv += ["-d", args.device]
    if args.threads:
        argv += ["-t", str(args.threads)]
    env = dict(os.environ)
    if args.cache:  # ggml's server keeps tensors it received in LLAMA_CACHE/rpc
        argv.append("-c")
        env["LLAMA_CACHE"] = os.path.abspath(args.cache)  # before the chdir below
    if os.name == "posix":  # this process becomes the server: signals reach it, nothing is left behind
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(PACKAGE_DIR)  # where a portable build's backends are (see lamina.tools)
        server = str(tools.path("ggml-rpc-server"))
        os.execve(server, [server, *argv], tools.environment(env))
    proc = tools.popen("ggml-rpc-server", argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as the command line's users read them: what and where in their files, not in lamina's code."""
    print(f"lamina: {category.__name__}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamina", description="llama.cpp with exact offload, threads and KV control")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text for a prompt")
    run.add_argument("prompt", nargs="?", default="The three primary colors are")
    add_model_args(run)
    run.add_argument("-c", "--ctx-size", type=int, default=None, help="context tokens (default 4096)")
    add_thread_args(run)
    add_sampling_args(run, 128)
    run.add_argument("--stop", action="append", help="stop string (repeatable)")
    run.add_argument("--echo", action="store_true", help="print the prompt first")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="chat on stdin/stdout with the model's chat template")
    add_model_args(chat)
    chat.add_argument("--template", default=None, help="template string or built-in name (default: the model's)")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("-c", "--ctx-size", type=int, default=None, help="context tokens (default 4096)")
    add_thread_args(chat)
    add_sampling_args(chat, 512)
    chat.set_defaults(func=cmd_chat)

    rpcs = sub.add_parser("rpc-server", help="serve this machine's devices to other processes (ggml RPC)")
    rpcs.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    rpcs.add_argument("--port", type=int, default=50052)
    rpcs.add_argument("--device", default=None, help="ggml device names to serve, e.g. CUDA0,CPU (default: ggml's choice)")
    rpcs.add_argument("--threads", type=int, default=None, help="threads for the CPU device")
    rpcs.add_argument("--cache", default=None, help="folder where the server caches tensors it received")
    rpcs.set_defaults(func=cmd_rpc_server)

    # bench and doctor build their own subcommands, next to what they run
    bench.add_cli(sub)
    info = sub.add_parser("info", help="model facts and where its layers went")
    add_model_args(info)
    info.set_defaults(func=cmd_info)

    config = sub.add_parser("config", help="model.yml < LAMINA_* env < flags: `show` every value and its source "
                            "(path:line), `check` for CI (exit 1 on errors)")
    config_sub = config.add_subparsers(dest="action", required=True)
    for action, text in (("show", "every effective value and where it came from (default)"),
                         ("check", "exit 1 on errors (bad values, bad YAML, missing files), with --strict on "
                                   "unknown keys too; 0 otherwise")):
        c = config_sub.add_parser(action, help=text)
        c.add_argument("config", nargs="?" if action == "show" else None, default=None, help="model.yml")
        c.add_argument("--strict", action="store_true", help="unknown or unsupported keys are errors")
        c.add_argument("-m", "--model", help="GGUF file")
        c.add_argument("--no-gpu", action="store_true")
        c.add_argument("-ngl", "--n-gpu-layers", type=ngl, default=None)
        c.add_argument("-t", "--threads", type=int, default=None)
        c.add_argument("-c", "--ctx-size", type=int, default=None)
        c.set_defaults(func=cmd_config)
    doctor.add_cli(sub)

    argv = list(sys.argv[1:] if argv is None else argv)
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if words and argv[words[0]] == "config" and "-h" not in argv and "--help" not in argv:
        if len(words) > 1 and argv[words[1]] in ("show", "check"):  # `config --strict check x.yml` too
            argv.insert(words[0] + 1, argv.pop(words[1]))
        else:
            argv.insert(words[0] + 1, "show")  # `lamina config [model.yml]` shows it
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(args.func(args))
    except (LaminaError, OSError, ValueError) as exc:
        print(f"lamina: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlamina: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
