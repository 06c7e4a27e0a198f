-- Chat rooms. A 1-on-1 (DM) room is never stored: its name is derived from the pair of user ids
-- and its messages are the ordinary 1-on-1 messages. Group rooms are rows with members; their
-- messages carry room_id instead of receiver_id.
CREATE TABLE rooms (
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL,
    name        text NOT NULL,
    title       text NOT NULL DEFAULT '',
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE room_members (
    room_id       uuid NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    tenant_id     text NOT NULL,
    user_id       text NOT NULL,
    role          text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')),
    joined_at     timestamptz NOT NULL DEFAULT now(),
    last_read_id  uuid,
    PRIMARY KEY (room_id, user_id)
);
-- "my rooms"
CREATE INDEX room_members_user_idx ON room_members (tenant_id, user_id, room_id);

ALTER TABLE messages
    ALTER COLUMN receiver_id DROP NOT NULL,
    ADD COLUMN room_id uuid REFERENCES rooms (id) ON DELETE CASCADE,
    ADD CONSTRAINT messages_one_target CHECK ((receiver_id IS NULL) <> (room_id IS NULL));
CREATE INDEX messages_room_idx ON messages (room_id, id DESC) WHERE room_id IS NOT NULL;
