-- The users service's own database.
CREATE TABLE users (
    id         BIGSERIAL PRIMARY KEY,
    email      TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The hot lookup (sign-in, duplicates), and what makes a second sign-up with an email a 409.
CREATE UNIQUE INDEX idx_user_email ON users (email);
