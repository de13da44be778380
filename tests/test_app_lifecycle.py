"""The app's start-up and shutdown, in process."""

import gc

from gateway.api.app import create_app
from gateway.config import Settings
from gateway.service import Gateway


async def test_start_up_objects_are_frozen_out_of_the_collector_until_shutdown() -> None:
    guarded = create_app(Gateway.from_settings(Settings(auth="off", metrics=False)))
    app = guarded.app  # the FastAPI app inside the request guard
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
