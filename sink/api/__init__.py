"""`sink serve`: usage over HTTP, OpenMeter's meter API, scoped to each customer namespace.

`auth` (bearer tokens to grants), `query` (the query parameters and their checks), `store`
(where usage is read: ClickHouse, a pool of read-only connections), `documents` (the JSON
and CSV the API answers), `problems` (errors as RFC 7807 problems), `routes` (the
endpoints), `metrics` (Prometheus), `server` (the application and its process).
"""
