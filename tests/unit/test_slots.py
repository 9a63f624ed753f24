from hypothesis import given, settings
from hypothesis import strategies as st

from detector.slots import SlotTable

names = st.text(min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove"]), names), max_size=300))
def test_the_table_agrees_with_a_dict_through_adds_and_removes(operations):
    table, model = SlotTable(size=16), {}
    for op, name in operations:
        if op == "add" and name not in model:
            model[name] = table.add(name)
        elif op == "remove":
            assert table.remove(name) == model.pop(name, None)
    queried = [name for _, name in operations] + ["never-seen"]
    assert table.lookup_many(queried).tolist() == [model.get(n, -1) for n in queried]
    assert len(table) == len(model)
    assert sorted(table.names()) == sorted(model)
    assert len(set(model.values())) == len(model)  # no two streams share a slot


def test_slots_are_reused_and_the_table_grows():
    table = SlotTable(size=16)
    ids = [f"stream-{i}" for i in range(1000)]
    for name in ids:
        table.add(name)
    assert table.lookup_many(ids).tolist() == list(range(1000))
    assert table.remove("stream-7") == 7
    assert table.add("newcomer") == 7 and table.used == 1000
