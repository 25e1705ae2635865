"""`python -m composemirror` and the `composemirror` command: the command line.

Kept light: SIGINT is heeded before the command's modules load (a third of a second).
"""

import signal
import sys


def run() -> None:
    """Run the command line and exit with its code; 130 when interrupted (Ctrl-C) early.

    A shell starts a background job (`composemirror up &` in a script) with SIGINT ignored,
    and Python then leaves it ignored; compose heeds it all the same (Go's `signal.Notify`
    undoes the ignore), and so does this, from before the command's modules are imported.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from composemirror.cli import main

        code = main()
    except KeyboardInterrupt:
        print("composemirror: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    sys.exit(code)


if __name__ == "__main__":
    run()
