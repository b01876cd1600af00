-- The line below splits a script's source (pipeline/scripts.py): the helper files
-- before it are a Redis Function library's top level, run once at load; from it on
-- (this file, then the script's own) runs at every call.
-- @per-call
begin_call()
