-- A sample of the Driftwood CRM schema, for the tests, `walhook demo` and the benchmark.
-- walhook never applies this to a real database: the CRM owns its tables. walhook only
-- relies on each table having `id` and `account_id`; every other column is carried as is.

-- (gen_random_uuid() is built into PostgreSQL 13 and later: no extension needed.)

CREATE TYPE activity_kind AS ENUM ('call', 'email', 'meeting', 'note', 'task');

CREATE TABLE companies (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id      uuid NOT NULL,
    name            text NOT NULL,
    domain          text,
    industry        text,
    employee_count  integer,
    annual_revenue  numeric(14, 2),
    tags            text[] NOT NULL DEFAULT '{}',
    custom_fields   jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE contacts (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id        uuid NOT NULL,
    company_id        uuid,
    first_name        text,
    last_name         text,
    email             text,
    phone             varchar(40),
    title             text,
    lead_score        integer,
    lifetime_value    numeric(12, 2),
    is_subscribed     boolean NOT NULL DEFAULT true,
    birthday          date,
    tags              text[] NOT NULL DEFAULT '{}',
    custom_fields     jsonb NOT NULL DEFAULT '{}',
    last_contacted_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE activities (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id       uuid NOT NULL,
    contact_id       uuid,
    kind             activity_kind NOT NULL DEFAULT 'note',
    subject          text,
    body             text,
    due_date         date,
    completed        boolean NOT NULL DEFAULT false,
    duration_minutes integer,
    metadata         jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id     uuid NOT NULL,
    company_id     uuid,
    name           text NOT NULL,
    status         text NOT NULL DEFAULT 'active',
    budget         numeric(14, 2),
    start_date     date,
    end_date       date,
    priority       smallint,
    estimate_hours bigint,
    tags           text[] NOT NULL DEFAULT '{}',
    custom_fields  jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Not published: writes here must never become webhooks, but must not hold the slot back.
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    account_id uuid,
    message    text,
    created_at timestamptz NOT NULL DEFAULT now()
);
