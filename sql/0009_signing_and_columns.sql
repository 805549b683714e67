-- Signing and payload (issue 20): secret rotation with overlap, ed25519 (v1a) signatures and
-- changed-column filters.
--
-- signature_scheme: 'v1' (HMAC-SHA256 with a whsec_ secret) or 'v1a' (ed25519: the secret
-- column holds the whsk_ private key, public_key its whpk_ public key, shown to the customer).
ALTER TABLE walhook.endpoints ADD COLUMN signature_scheme text NOT NULL DEFAULT 'v1'
    CHECK (signature_scheme IN ('v1', 'v1a'));
ALTER TABLE walhook.endpoints ADD COLUMN public_key text;
-- previous_secret: the secret (or private key) a rotation replaced, stored like secret
-- (sealed, bound to the endpoint), signing beside the new one until previous_secret_expires_at.
ALTER TABLE walhook.endpoints ADD COLUMN previous_secret text;
ALTER TABLE walhook.endpoints ADD COLUMN previous_secret_expires_at timestamptz;
-- update_columns: {"<crm table>": ["<column>", …]}: an update of such a table reaches the
-- endpoint only when one of those columns changed. NULL: no filter. Routing state, so it is
-- versioned with the rest of routing (a replay filters as of the change's commit).
ALTER TABLE walhook.endpoints ADD COLUMN update_columns jsonb;
ALTER TABLE walhook.endpoint_versions ADD COLUMN update_columns jsonb;
