/*
 * pimcore.h -- the C ABI of pimcore: embed the instant-messaging broker in a
 * C, C++, Go, Rust, ... process.  Link with -lpimcore (libpimcore.so, built
 * by `make -C bindings`; see bindings/README.md).
 *
 * THREADING
 *   - Every function may be called from any thread, concurrently, except
 *     where noted.  The library starts its embedded Python interpreter once
 *     per process, on the first call that needs it (100-150 ms), and never
 *     finalizes it.
 *   - Each broker runs its event loop in a thread of its own.  A blocking
 *     call (pim_post, pim_group_*, pim_revoke, pim_unread_count, ...) hands
 *     the work to that thread and waits: they are safe from many threads at
 *     once, and cost a thread hop (tens of microseconds) plus the commit.
 *   - Event callbacks run on a library thread, one call at a time per
 *     callback, in event-id order.  From there you may call the library
 *     again (pim_post, ...), except pim_broker_stop, pim_broker_free and
 *     pim_set_event_callback for that broker: they would wait for the
 *     callback itself and fail with PIM_ERR_WOULD_DEADLOCK.  Across
 *     brokers too: pim_broker_stop, pim_broker_free and
 *     pim_set_event_callback of broker B from A's callback go through,
 *     unless a callback of B waits in turn (through such a call, on any
 *     number of brokers) for A's callback -- B's callback stopping A while
 *     A's stops B.  The call that would close that cycle fails with
 *     PIM_ERR_WOULD_DEADLOCK, nothing done; the other proceeds once the
 *     refused callback returns.  With PIM_EVENTS_ON_LOOP_THREAD the callback runs on the broker's loop
 *     thread (cheaper, but it must not block): every blocking call from it
 *     fails with PIM_ERR_WOULD_DEADLOCK instead of hanging.
 *   - Data handed to a callback (strings, payloads, the pim_event) is valid
 *     only during the call: copy what you keep.
 *   - pim_last_error() is per thread: read it on the thread that got the
 *     error, before the next call.
 *
 * FORK
 *   libpimcore is not fork-safe: use it only in the process that made the
 *   first call (the one that started the embedded Python).  In a child made
 *   by fork() every call fails at once with PIM_ERR_INIT (pim_last_error
 *   says so) instead of waiting for threads the child does not have; the
 *   parent's brokers run on, unaffected.  pim_broker_free in the child
 *   releases the handle's memory (and returns PIM_ERR_INIT).  pim_version,
 *   pim_strerror, pim_last_error and pim_free work anywhere.  A child that
 *   needs pimcore should exec a program of its own.  A fork before the
 *   first call is harmless.
 *
 * CONVENTIONS
 *   - Every function returns an int status: PIM_OK (0) or a PIM_ERR_* code
 *     (stable: codes are never renumbered).  pim_strerror(rc) names a code;
 *     pim_last_error() says what went wrong in the last failed call.
 *   - Strings are NUL-terminated UTF-8; payloads are a pointer and a length.
 *   - Options are one JSON object with the keys of pimcore's configuration
 *     file (docs/OPERATIONS.md), e.g.
 *       {"data_dir": "chat-data", "durability": "sync",
 *        "listen": ["tcp://127.0.0.1:7400"], "server": {"events": true}}
 *     An embedded broker listens where "listen" says and serves HTTP where
 *     "http" says, nowhere else: PIMCORE_LISTEN and PIMCORE_HTTP never open,
 *     add or move a listener.  Every other setting's PIMCORE_* environment
 *     variable overrides the JSON, as it overrides the file (bindings/README.md,
 *     Options).
 *   - The library writes nothing to stdout or stderr: errors come back as
 *     status codes and pim_last_error().  PIM_DEBUG=debug|info|warning|error
 *     (1: debug) in the environment prints pimcore's log lines on stderr.
 *     Two exceptions, both start-up failures (PIM_ERR_INIT, once per
 *     process) that happen before any code of the library's own can catch
 *     them: CPython itself prints its path configuration when it cannot
 *     start at all (PYTHONHOME wrong, no standard library), and cffi prints
 *     its traceback if its module in that environment is present but
 *     unusable (a cffi too old for the library).  An environment without
 *     cffi, without pimcore or of another Python is reported through
 *     pim_last_error only.
 */
#ifndef PIMCORE_H
#define PIMCORE_H

#include <stddef.h>
#include <stdint.h>

#define PIM_VERSION_MAJOR 0
#define PIM_VERSION_MINOR 3
#define PIM_VERSION_PATCH 0
/* The version this header describes; pim_broker_start passes it and the
 * library refuses (PIM_ERR_VERSION) a header newer than itself, of another
 * major version, or older than the first (0.1.0 = 100; a negative number
 * too).  0.2 appended fields to pim_event, 0.3 added
 * pim_broker_http_port; a program built with an older header still runs
 * against this library. */
#define PIM_VERSION_NUMBER (PIM_VERSION_MAJOR * 10000 + PIM_VERSION_MINOR * 100 + PIM_VERSION_PATCH)

#if defined(PIM_BUILDING)
#  define PIM_EXPORT __attribute__((visibility("default")))
#else
#  define PIM_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes (stable). */
enum pim_status {
    PIM_OK = 0,
    PIM_ERR_INVALID = 1,              /* a NULL or bad argument (an invalid id, a bad flag) */
    PIM_ERR_CONFIG = 2,               /* the options are not a JSON object or not usable settings (an unknown
                                       * key, a wrong type, a data_dir that is not a directory or cannot be
                                       * created) */
    PIM_ERR_INIT = 3,                 /* the embedded Python or pimcore did not start in this process,
                                       * or this process is a fork() child of the one that started it */
    PIM_ERR_VERSION = 4,              /* pimcore.h is newer than the library, or of another major version */
    PIM_ERR_STOPPED = 5,              /* the broker was stopped */
    PIM_ERR_ALREADY_RUNNING = 6,      /* a broker of this process already runs on that data directory's LMDB store */
    PIM_ERR_WOULD_DEADLOCK = 7,       /* called from a callback the call would have to wait for (its own
                                       * broker's, or one waiting for it through other brokers) */
    PIM_ERR_UNKNOWN_CONVERSATION = 8, /* no such conversation */
    PIM_ERR_NOT_MEMBER = 9,           /* the sender is not a member of the conversation */
    PIM_ERR_ALREADY_EXISTS = 10,      /* the group exists */
    PIM_ERR_DUPLICATE_CONFLICT = 11,  /* an idempotency key reused for another message */
    PIM_ERR_PAYLOAD_TOO_LARGE = 12,   /* over limits.max_payload */
    PIM_ERR_REFUSED = 13,             /* another refusal of the broker (pim_last_error says which) */
    PIM_ERR_STORE = 14,               /* the store failed, or cannot be opened (another process runs a broker
                                       * on it, its files are damaged) */
    PIM_ERR_IO = 15,                  /* an operating-system error (a listener cannot bind, ...) */
    PIM_ERR_NOT_FOUND = 16,           /* no such listener */
    PIM_ERR_NOMEM = 17,               /* out of memory */
    PIM_ERR_INTERNAL = 18             /* a bug: please report pim_last_error() */
};

/* An embedded broker (opaque). */
typedef struct pim_broker pim_broker;

/* The library's version as text, "MAJOR.MINOR.PATCH": the PIM_VERSION_MAJOR,
 * _MINOR and _PATCH of the pimcore.h it was built with (this header's, when
 * they match; PIM_VERSION_NUMBER is what pim_broker_start checks).  Each
 * pointer may be NULL. */
PIM_EXPORT const char *pim_version(int *major, int *minor, int *patch);
/* A static description of a status code (never NULL). */
PIM_EXPORT const char *pim_strerror(int rc);
/* What went wrong in this thread's last failed call ("" if nothing): UTF-8,
 * at most 1023 bytes (a longer text is cut at a character boundary).  It
 * points into the thread's own buffer (valid until the thread ends), whose
 * text the thread's next pim_* call replaces (all but pim_last_error,
 * pim_strerror, pim_version and pim_free). */
PIM_EXPORT const char *pim_last_error(void);

/* Start a broker with the options config_json (see CONVENTIONS) and return
 * it in *out once it is up (listening, if it listens); *out is NULL after
 * an error.  Call it through the pim_broker_start macro (header_version:
 * PIM_VERSION_NUMBER).  Errors: PIM_ERR_INVALID (NULL, config_json not
 * UTF-8), PIM_ERR_CONFIG, PIM_ERR_ALREADY_RUNNING, PIM_ERR_STORE, PIM_ERR_IO
 * (a listener cannot bind), PIM_ERR_INIT, PIM_ERR_VERSION. */
PIM_EXPORT int pim_broker_start_(const char *config_json, pim_broker **out, int header_version);
#define pim_broker_start(config_json, out) pim_broker_start_((config_json), (out), PIM_VERSION_NUMBER)

/* Stop the broker gracefully: clients get Close(SHUTDOWN), everything is
 * flushed and the store closed (what pim_post acknowledged is durable; this
 * does not rely on process exit).  The handle stays valid: later calls fail
 * with PIM_ERR_STOPPED; stopping again is PIM_OK.  Then pim_broker_free. */
PIM_EXPORT int pim_broker_stop(pim_broker *b);
/* Stop (if needed) and release the handle.  NULL is a no-op (PIM_OK; it
 * clears pim_last_error as every call does).  The handle
 * is released whatever the error, except PIM_ERR_WOULD_DEADLOCK (called
 * from a callback of b, or of a broker whose stop b's callback waits for:
 * THREADING; free it from another thread). */
PIM_EXPORT int pim_broker_free(pim_broker *b);
/* The bound TCP port of the first tcp:// listener (the one the OS chose
 * for port 0).  PIM_ERR_NOT_FOUND without one. */
PIM_EXPORT int pim_broker_port(pim_broker *b, int *out_port);
/* The bound TCP port of the HTTP listener ({"http": {"listen":
 * "tcp://HOST:PORT"}}; the one the OS chose for port 0).  PIM_ERR_NOT_FOUND
 * without one.  Since 0.3. */
PIM_EXPORT int pim_broker_http_port(pim_broker *b, int *out_port);

/* Store payload in conv and deliver it like a client's message; returns
 * once it is durable, with its id and seq (either out pointer may be NULL).
 * sender/device: a member and one of its device ids, or both NULL for the
 * system (allowed in every conversation); an empty string is no id
 * (PIM_ERR_INVALID), not the system.  Give the host a device id of its
 * own ("host"): a post as one of the user's client devices is that
 * device's own send, never pushed to it.  idempotency_key (NULL: none, at
 * most 256 bytes): posts with the same sender, device and key are one
 * message, and a retry gets the original's id and seq.  Errors:
 * PIM_ERR_INVALID (conv NULL, payload NULL with a length, only one of
 * sender/device, an empty or invalid id, a string not UTF-8),
 * PIM_ERR_UNKNOWN_CONVERSATION, PIM_ERR_NOT_MEMBER,
 * PIM_ERR_DUPLICATE_CONFLICT, PIM_ERR_PAYLOAD_TOO_LARGE (len over
 * limits.max_payload: checked before payload is read, so no byte past
 * max_payload is ever touched), PIM_ERR_REFUSED, PIM_ERR_STORE,
 * PIM_ERR_STOPPED. */
PIM_EXPORT int pim_post(pim_broker *b, const char *conv, const char *sender, const char *device,
                        const void *payload, size_t len, const char *idempotency_key,
                        uint8_t out_msg_id[16], uint64_t *out_seq);

/* One post of pim_post_batch: the inputs as pim_post's, then the outputs. */
typedef struct pim_post_item {
    const char *conv;
    const char *sender;          /* NULL with device NULL: the system ("" is refused) */
    const char *device;
    const void *payload;
    size_t len;
    const char *idempotency_key; /* NULL: none */
    int status;                  /* out: PIM_OK or this post's error */
    uint64_t seq;                /* out */
    uint8_t msg_id[16];          /* out */
} pim_post_item;
/* n posts at once, committed together where the broker can.  Each item is
 * decided on its own: an invalid item (conv NULL, payload NULL with a length,
 * only one of sender/device, an empty id, a string not UTF-8) gets PIM_ERR_INVALID and a
 * refused one its refusal, while the valid ones are posted (status PIM_OK,
 * seq and msg_id set).  If the call fails as a whole (broker NULL or stopped,
 * ...) every item not otherwise decided gets that status.  So the status
 * fields alone say what was stored; seq is 0 for an item not stored.
 * Returns PIM_OK when every post was stored, else the first failed item's
 * status (pim_last_error names the item), or the whole call's. */
PIM_EXPORT int pim_post_batch(pim_broker *b, pim_post_item *items, size_t n);

/* Group administration, ordered with the messages around it.  members: n
 * user ids, n >= 1 (create: a group needs at least one member; add and
 * remove of no users: PIM_ERR_INVALID, nothing changed; remove: a
 * removal that would leave the group with no member is refused as a whole,
 * PIM_ERR_INVALID, no one removed -- purge the conversation to delete a
 * group).  Errors: PIM_ERR_ALREADY_EXISTS (create),
 * PIM_ERR_UNKNOWN_CONVERSATION (add, remove), PIM_ERR_INVALID. */
PIM_EXPORT int pim_group_create(pim_broker *b, const char *conv, const char *const *members, size_t n);
PIM_EXPORT int pim_group_add_members(pim_broker *b, const char *conv, const char *const *users, size_t n);
PIM_EXPORT int pim_group_remove_members(pim_broker *b, const char *conv, const char *const *users, size_t n);

/* End user's sessions now (only device's if not NULL) with Close(KICKED);
 * reason may be NULL.  Not durable: see pim_revoke. */
PIM_EXPORT int pim_kick(pim_broker *b, const char *user, const char *device, const char *reason);
/* Refuse user's tokens (only device's if not NULL; "" is PIM_ERR_INVALID)
 * issued before before_us (µs since the Unix epoch; 0: now), durably, and
 * end the live sessions using one.  *out_before (may be NULL): the time in
 * force (for device, the later of the user's and the device's). */
PIM_EXPORT int pim_revoke(pim_broker *b, const char *user, const char *device, int64_t before_us,
                          int64_t *out_before);
/* A login token for user (bound to device if not NULL), valid ttl_seconds,
 * in *out_token: free it with pim_free. */
PIM_EXPORT int pim_token_issue(pim_broker *b, const char *user, const char *device, int64_t ttl_seconds,
                               char **out_token);
/* The exact number of messages from others in conv after user's read
 * marker, leaving out those user deleted for themselves (0 for a
 * conversation the user is not in; PIM_ERR_UNKNOWN_CONVERSATION for a group
 * that does not exist). */
PIM_EXPORT int pim_unread_count(pim_broker *b, const char *user, const char *conv, uint64_t *out_count);

/* What a conversation entry is (pim_event.kind of a "message" event;
 * pimcore's MessageKind).  Every kind is seq'd, stored and delivered like
 * a message, except DELETE. */
#define PIM_KIND_MESSAGE 0  /* a message: payload is the sender's */
#define PIM_KIND_JOINED 1   /* sender joined the group at this seq (payload: the user who added them, "" the host) */
#define PIM_KIND_LEFT 2     /* sender left or was removed at this seq (payload as for JOINED) */
#define PIM_KIND_RECALL 3   /* sender (or the host: sender "") recalled the message at seq target for everyone;
                             * payload empty.  A consumer that keeps payloads should drop the target's. */
#define PIM_KIND_EDIT 4     /* sender (or the host) replaced the payload of the message at seq target;
                             * payload: the message's payload now */
#define PIM_KIND_DELETE 5   /* sender deleted the message at seq target for themselves only: seq 0 (it takes
                             * no seq of the conversation), payload empty */

/* One host event (docs/EMBEDDING.md, Events).  Fields a type does not use
 * are 0, NULL or empty.  Valid only during the callback.
 *
 * type and the fields it fills:
 *   "message"       a stored entry: conv, seq, msg_id, sender, device, kind
 *                   (PIM_KIND_*), server_time, local_id, payload,
 *                   recipients, offline_recipients, target (RECALL, EDIT,
 *                   DELETE), muted_recipients, mentioned, mention_all
 *   "conversation"  user changed their settings of conv: pinned, muted,
 *                   hidden (the settings now), muted_recipients = {user}
 *                   when muted
 *   "read"          user's read marker in conv moved to seq (unread left)
 *   "online"        user's device logged in
 *   "offline"       user's device's session ended (code, reason)
 *   "kicked"        the host kicked user's device (reason)
 * Later versions may add types and kinds: skip (and acknowledge) the ones
 * you do not know. */
/* The library allocates every pim_event and hands the callback a pointer to
 * it: later versions only ever append fields, so a program built against an
 * older header reads a valid prefix.  Never allocate or copy one by value. */
typedef struct pim_event {
    uint64_t id;                  /* gap-free, ascending: the cursor to ack */
    const char *type;             /* "message", "conversation", "read", "online", "offline", "kicked" */
    int64_t time;                 /* µs since the Unix epoch */
    const char *conv;
    uint64_t seq;
    uint8_t msg_id[16];
    const char *sender;           /* "" for the system */
    const char *device;
    int kind;                     /* message: a PIM_KIND_* */
    int64_t server_time;          /* µs */
    const void *payload;
    size_t payload_len;
    const char *const *recipients;          /* every user it was fanned out to, the sender included */
    size_t n_recipients;
    const char *const *offline_recipients;  /* those with no device online: push */
    size_t n_offline_recipients;
    const char *user;             /* conversation, read, online, offline, kicked */
    uint64_t unread;              /* read */
    const char *code;             /* offline: the close code's name, NULL if the connection was lost */
    const char *reason;           /* offline, kicked */
    /* Since 0.2 (PIM_VERSION_NUMBER 200): */
    uint64_t target;              /* message, kinds RECALL, EDIT, DELETE: the seq of the message acted on */
    uint64_t local_id;            /* message: the sending device's local id; for a host post the hash of its
                                   * idempotency key (BLAKE2b, 64 bits), or a random one without a key: never 0 */
    const char *const *muted_recipients;    /* message: recipients who muted conv (skip or silence their push);
                                             * conversation: {user} when muted */
    size_t n_muted_recipients;
    const char *const *mentioned; /* message: the recipients it mentions (never the sender) */
    size_t n_mentioned;
    int mention_all;              /* message: 1 if it mentions everyone */
    int pinned;                   /* conversation: user's settings of conv after the change, 0 or 1 */
    int muted;
    int hidden;
} pim_event;

/* Return PIM_EVENT_ACK to acknowledge the event (and every earlier one:
 * acks are cumulative, made durable after each batch of events), or
 * PIM_EVENT_KEEP to leave it to pim_ack_events. */
#define PIM_EVENT_ACK 0
#define PIM_EVENT_KEEP 1
typedef int (*pim_event_cb)(const pim_event *event, void *userdata);

/* Run the callback on the broker's loop thread (see THREADING). */
#define PIM_EVENTS_ON_LOOP_THREAD 1u

/* Hand consumer's durable host events (consumer NULL: "default") to cb,
 * starting after the consumer's acknowledged cursor: what was not
 * acknowledged is delivered again after a restart (at least once).  cb
 * NULL removes the callback (waiting for a running call to return).
 * The broker needs "server": {"events": true} (else PIM_ERR_INVALID, for a
 * removal -- cb NULL -- too).
 * Errors: PIM_ERR_INVALID (no events, unknown flags, consumer not a valid
 * id -- "" included, also when removing), PIM_ERR_WOULD_DEADLOCK (from an
 * event callback of this broker, or of one whose callback waits for this
 * broker's: THREADING), PIM_ERR_STOPPED. */
PIM_EXPORT int pim_set_event_callback(pim_broker *b, const char *consumer, pim_event_cb cb, void *userdata,
                                      unsigned flags);
/* consumer (NULL: "default") has handled every event up to id upto: its
 * durable cursor moves to min(upto, the last event id), never back, durable
 * when this returns; *out_cursor (may be NULL) gets the cursor in force.
 * Errors: PIM_ERR_INVALID (no events, consumer not a valid id),
 * PIM_ERR_STORE, PIM_ERR_STOPPED. */
PIM_EXPORT int pim_ack_events(pim_broker *b, const char *consumer, uint64_t upto, uint64_t *out_cursor);
/* Delete consumer's (NULL: "default") durable cursor -- a name read once by
 * mistake holds the reclaim of every later event back: the reclaim stops
 * waiting for it, and a later read of the name starts a fresh cursor at 0,
 * as a first read does.  No event is touched; durable when this returns.
 * *out_deleted (may be NULL) gets 1 if it had a cursor, 0 if it had none
 * (nothing changed; PIM_OK either way).
 * Errors: PIM_ERR_INVALID (no events, consumer not a valid id),
 * PIM_ERR_REFUSED (the consumer is in use: its event callback is set, or
 * another reader of this broker reads it, or one read or acked it within
 * the last [server] consumer_idle seconds (60), or the broker started
 * within them -- remove the callback first, and wait; nothing deleted; a
 * name with no cursor is PIM_OK, *out_deleted 0, first), PIM_ERR_STORE,
 * PIM_ERR_STOPPED. */
PIM_EXPORT int pim_delete_consumer(pim_broker *b, const char *consumer, int *out_deleted);

/* Free memory the library returned (pim_token_issue).  NULL is a no-op. */
PIM_EXPORT void pim_free(void *p);

#ifdef __cplusplus
}
#endif

#endif /* PIMCORE_H */
