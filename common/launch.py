"""torchrun, with its failure report left out when the run stopped on a known bad input.

    python -m common.launch --nproc_per_node 2 grpo.py --model nope/hf     # same arguments as torchrun

A trainer that meets a known bad input (a missing or unreadable model, a bad data row, a bad flag) prints one
`error:` line and ends every rank with exit code 2. torchrun then reports the failed workers itself: its own
traceback and a table of the ranks' exit codes, about 40 lines after the error line, and exit code 1. That report
cannot be switched off by a torchrun flag. This runs torchrun with the same arguments and passes its output
through as it comes, except that whatever follows a worker's `error:` line on stderr is held back; when torchrun
ends with an error line seen, the line is printed last and the exit code is 2. Every other failure passes through
whole (torchrun's report is then what you want to read).
"""
import subprocess
import sys


def main(argv):
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], stderr=subprocess.PIPE, text=True,
                         bufsize=1, errors="replace")
    error, held = None, []
    try:
        for line in p.stderr:
            if error is None and line.startswith("error: "):
                error = line
            elif error is None:
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                held.append(line)
        rc = p.wait()
    except KeyboardInterrupt:  # torchrun got the same SIGINT (one process group) and stops its workers
        rc = p.wait()
    if error is not None and rc != 0:
        sys.stdout.flush()
        sys.stderr.write(error)
        return 2
    sys.stderr.writelines(([error] if error else []) + held)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
