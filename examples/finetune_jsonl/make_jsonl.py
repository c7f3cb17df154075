"""Write a small JSONL corpus to stdout: the docstrings of this Python's standard-library modules.

    python examples/finetune_jsonl/make_jsonl.py > /tmp/mine.jsonl
"""

import importlib
import json
import sys

MODULES = ("argparse", "collections", "csv", "datetime", "functools", "itertools", "json", "logging", "pathlib",
           "re", "shutil", "string", "subprocess", "textwrap", "urllib.parse")

for name in MODULES:
    module = importlib.import_module(name)
    for attr in [module, *vars(module).values()]:
        doc = getattr(attr, "__doc__", None)
        if isinstance(doc, str) and len(doc) > 200 and getattr(attr, "__module__", name) == name:
            sys.stdout.write(json.dumps({"text": doc.strip(), "source": name}) + "\n")
