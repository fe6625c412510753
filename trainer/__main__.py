import signal
import sys

from trainer.cli import main

code = main()
# The command is over (its files are complete): a Ctrl-C now would only turn the exit code into 130.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(code)
