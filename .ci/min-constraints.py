"""Print a pip constraints file that pins every dependency in setup.cfg (install_requires and the
test extra) to its declared floor: `name>=X` becomes `name==X`, markers kept. .ci/run installs the
package under these constraints and runs the suite, so a floor that does not work fails CI."""

import configparser
import re
import sys
from pathlib import Path

# name>=floor, optionally with an upper bound (",<X") and a marker
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)"
                   r"\s*(?:,\s*<\s*[^,;\s]+\s*)?(;.*)?$")

cfg = configparser.ConfigParser()
cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
seen: dict[str, str] = {}
for line in filter(str.strip, lines):
    match = FLOOR.match(line)
    if match is None:
        sys.exit(f"setup.cfg: no '>=' floor in {line.strip()!r}: every dependency needs a tested floor")
    name, version, marker = match.groups()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        sys.exit(f"setup.cfg: {name} is declared twice ({seen[key]!r} and {line.strip()!r}): "
                 "one floor per dependency")
    seen[key] = line.strip()
    print(f"{name}=={version}{(' ' + marker) if marker else ''}")
