"""The /v1 API's request count per key and minute, in PostgreSQL, so every Odoo worker (process)
shares one count, and the key's last-used time.

Both are written on a cursor of their own in autocommit (the caller's: see the controller), not in
the request's transaction: each statement commits at once, so a row lock is held for one
statement, never for a whole request; READ COMMITTED (autocommit) makes concurrent upserts of
one row wait for each other for that statement and then add up, never fail as REPEATABLE READ
would. Plain SQL on a DB-API cursor: no Odoo import.
"""

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS llm_api_rate (
    key_id integer NOT NULL,
    minute bigint NOT NULL,  -- unix time // 60
    hits integer NOT NULL,
    PRIMARY KEY (key_id, minute)
)"""
LAST_USED_RESOLUTION = 60  # seconds: last_used is rewritten at most this often (no write per request)


def create_table(cr):
    cr.execute(TABLE_SQL)


def count_request(cr, key_id, per_minute, now):
    """Count one request of `key_id` in the minute of `now` (unix seconds); (allowed, seconds to
    wait). `per_minute` 0 or None: no limit, nothing counted. A refused request counts too, so a
    client that keeps knocking stays refused until the minute ends."""
    if not per_minute:
        return True, 0
    minute = int(now) // 60
    cr.execute("""
        INSERT INTO llm_api_rate (key_id, minute, hits) VALUES (%s, %s, 1)
        ON CONFLICT (key_id, minute) DO UPDATE SET hits = llm_api_rate.hits + 1
        RETURNING hits""", (key_id, minute))
    hits = cr.fetchone()[0]
    if hits == 1:  # the key's first request this minute: forget its earlier minutes
        cr.execute('DELETE FROM llm_api_rate WHERE key_id = %s AND minute < %s', (key_id, minute))
    if hits > per_minute:
        return False, max(1, (minute + 1) * 60 - int(now))
    return True, 0


def stamp_last_used(cr, key_id, resolution=LAST_USED_RESOLUTION):
    """Set the key's last_used to now unless it was set less than `resolution` seconds ago; a key
    row locked by someone else (a manager editing it) is skipped, not waited for."""
    cr.execute("""
        UPDATE llm_api_key SET last_used = now() at time zone 'UTC'
         WHERE id IN (SELECT id FROM llm_api_key
                       WHERE id = %s AND (last_used IS NULL
                             OR last_used < (now() at time zone 'UTC') - interval '1 second' * %s)
                         FOR UPDATE SKIP LOCKED)""", (key_id, resolution))
    return cr.rowcount == 1
