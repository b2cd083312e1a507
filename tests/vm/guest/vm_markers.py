"""A pytest plugin for the test VM: each test case in the junit xml names its markers.

junit xml has no place for markers, so the host could not tell a ``cgroup_v2`` test that ran from any
other. This adds a ``markers`` property to every test case (``<property name="markers"
value="cgroup_v2 root"/>``), which the host reads to check that the cgroup v2 tests ran and were not
skipped. job.sh loads it with ``-p vm_markers``.
"""


def pytest_collection_modifyitems(items):
    for item in items:
        names = sorted({marker.name for marker in item.iter_markers()})
        item.user_properties.append(("markers", " ".join(names)))
