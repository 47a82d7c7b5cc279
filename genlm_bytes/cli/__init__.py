"""Command line: ``python -m genlm_bytes`` or ``genlm-bytes``, with three subcommands.

Modules: :mod:`~genlm_bytes.cli.args` (the parser), :mod:`~genlm_bytes.cli.session` (input,
model, beam), one module per command (``next``, ``generate``, ``score``), :mod:`~genlm_bytes.cli.format`
(output), :mod:`~genlm_bytes.cli.main` (dispatch and error reporting).

- ``next TEXT``: the most likely next bytes after TEXT, and TEXT's log-probability;
- ``generate TEXT``: stream a continuation of TEXT to stdout (greedy or sampled;
  ``--regex`` constrains it to a pattern, ``--smc N`` samples it with N particles);
- ``score [FILE]``: log-probability and bits per byte of a file (or stdin).

TEXT is taken as the UTF-8 bytes of the argument, or read from stdin when it is
``-``. Every subcommand uses a :class:`~genlm_bytes.ByteBeamState` (``--beam``,
``--prune``) over the embedded SmolLM2-135M, or ``--model FOLDER``; the model's
EOS tokens end generation. Arguments and input files are checked before the
model loads.

Exit codes: 0 done; 2 bad input (arguments, files, a model that cannot be
loaded); 1 anything else, e.g. a TEXT the model gives probability 0 (``score``
reports that as ``logp_nats: null`` and exits 0); 130 interrupted (Ctrl-C:
``generate`` flushes what it has and prints its summary). Errors are one line
on stderr; ``-v`` logs the traceback too. Output of ``generate`` is the
continuation only, as UTF-8 text; bytes that are not valid UTF-8 appear as
``\\xNN``, and a multi-byte character is printed once it is complete. The
progress bar of ``score`` (inputs over 256 bytes) goes to stderr.

Not handled: chat templates, constraints other than one regex, several texts per call,
appending EOS when scoring (a score is that of the bytes as a prefix).
"""
