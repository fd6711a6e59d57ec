"""A stand-in for an agent runner: prints what it received, with secret values masked."""

import json
import os
import sys
from pathlib import Path


def main() -> int:
    manifest = json.loads(Path(os.environ["STIGMER_MANIFEST"]).read_text())
    secret = {name for name, v in manifest["variables"].items() if v["secret"]}
    values = json.loads(Path(os.environ["STIGMER_ENV_JSON"]).read_text())

    def masked(text: str) -> str:
        for name in secret:
            text = text.replace(values[name], f"<{name}>")
        return text

    print(f"runner: execution {os.environ['STIGMER_EXECUTION_ID']}")
    print("runner: environment variables received:")
    for name in sorted(manifest["variables"]):
        shown = "******** (secret)" if name in secret else os.environ.get(name)
        print(f"  {name} = {shown}")
    print(f"runner: files in {os.path.dirname(os.environ['STIGMER_MCP_CONFIG'])}:")
    for name in sorted(os.listdir(os.path.dirname(os.environ["STIGMER_MCP_CONFIG"]))):
        print(f"  {name}")
    print("runner: mcp.json (secret values masked):")
    with open(os.environ["STIGMER_MCP_CONFIG"]) as handle:
        print("  " + masked(handle.read()).replace("\n", "\n  ").rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
