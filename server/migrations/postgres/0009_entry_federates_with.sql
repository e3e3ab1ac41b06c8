-- Schema version 9: the foreign trust domains a registration entry federates with, as
-- trust domain names separated by single spaces, in the entry's order ('' for none).
-- An entry written before this version federates with nothing.
ALTER TABLE entries ADD COLUMN federates_with TEXT NOT NULL DEFAULT '';
