import pytest
@pytest.fixture(autouse=True)
def _idle_after(request):
    yield
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        from tests.services.conftest import sample
        import time
        time.sleep(1)
        print("\nIDLE", request.node.name, [(t.metrics.tier, t.port, sample(t, "specsplit_active_sessions"), sample(t, "specsplit_sessions_opened_total"), sample(t, "specsplit_sessions_closed_total")) for t in c.tiers()])
        for k, g in c._gateways.items():
            print("GW", k, g.core.targets.load, g.core.drafts.load if g.core.drafts else None)
