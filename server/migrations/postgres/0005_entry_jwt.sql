-- Schema version 5: the JWT-SVID settings of a registration entry. An entry written
-- before this version reads back with the server's default TTL and no `jti`.
ALTER TABLE entries ADD COLUMN jwt_svid_ttl BIGINT NULL;  -- seconds; NULL = server default
ALTER TABLE entries ADD COLUMN jwt_svid_include_jti BOOLEAN NOT NULL DEFAULT FALSE;
