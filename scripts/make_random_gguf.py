#!/usr/bin/env python3
"""Write a random-weight GGUF of a real model's shape (see kvtuner_edge/random_model.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvtuner_edge.random_model import main  # noqa: E402

sys.exit(main())
