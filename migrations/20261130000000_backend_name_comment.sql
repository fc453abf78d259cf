-- Backend names need no prefix (Plane 0.5.5 makes names without one); only the comment
-- changes. Additive, like every migration: an older build keeps working on this schema.
comment on column backend.id is 'The backend name: 1 to 45 characters from [a-z0-9-], no prefix required (plane-db makes ba-..., Plane 0.5.5 makes 14 random characters).';
