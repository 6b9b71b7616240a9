"""Everything about Label Studio, for the backends, the trainer and the commands alike: the API client
(``client.py``), the bootstrap's state (``state.py``), the labeling config and its region formats
(``labeling.py``, ``regions.py``), the label map, image fetching under the URL policy, and bulk prediction."""
