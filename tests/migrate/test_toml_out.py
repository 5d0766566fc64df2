"""The TOML the import writes reads back as the same document, whatever the strings hold."""

from __future__ import annotations

import tomllib

from hypothesis import given
from hypothesis import strategies as st

from proxy.migrate import toml_out

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
scalar = st.one_of(text, st.integers(-2**63, 2**63 - 1), st.booleans(), st.lists(text, max_size=4))
table = st.dictionaries(text, scalar, max_size=4)


@given(top=table, tables=st.dictionaries(text, st.dictionaries(text, table, max_size=3),
                                         max_size=3),
       rows=st.lists(table.filter(bool), max_size=3))
def test_round_trip(top: dict, tables: dict, rows: list) -> None:
    document = {**{f"s{k}": v for k, v in top.items()},
                **{f"t{k}": v for k, v in tables.items()}}
    if rows:
        document["listeners"] = rows
    assert tomllib.loads(toml_out.dumps(document)) == document


def test_comment_and_quoted_keys() -> None:
    out = toml_out.dumps({"providers": {"a.b": {"x": 1}}}, {'providers."a.b"': "from here"})
    assert out == '[providers."a.b"]\n'.join(["# from here\n", "x = 1\n"])
    assert tomllib.loads(out) == {"providers": {"a.b": {"x": 1}}}
