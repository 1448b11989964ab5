"""第五步: plot training curves and evaluation results into outputs/*.png.

    python visualization/plot_results.py

A thin door into `zhlora plot`.
"""
import sys

from zhlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
