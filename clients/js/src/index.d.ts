// Type declarations for @pimcore/client (PIM wire protocol v4; docs/PROTOCOL.md).

/** `u`/`s` fields: a number when it fits in Number.MAX_SAFE_INTEGER, else a bigint. */
export type Int = number | bigint;

export declare const PROTOCOL_VERSION: 4;
export declare const CAP_ZSTD: 1;
export declare const CAP_DEFLATE_DOWN: 2;
export declare const CAP_DEFLATE_UP: 4;
/** Asked for by every Login: the broker then sends ConvPurged (the `purged` event). */
export declare const CAP_CONV_PURGED: 8;
export declare const FrameType: Readonly<Record<string, number>>;
export declare const ErrorCode: Readonly<Record<string, number>>;
export declare const CloseCode: Readonly<Record<string, number>>;
export declare const MessageKind: Readonly<{ MESSAGE: 0; JOINED: 1; LEFT: 2; RECALL: 3; EDIT: 4; DELETE: 5 }>;
/** PresenceEntry.state: UNKNOWN = not visible (no shared conversation), or this client is disconnected and cannot know. */
export declare const PresenceState: Readonly<{ UNKNOWN: 0; OFFLINE: 1; ONLINE: 2 }>;
export declare function codeName(table: Readonly<Record<string, number>>, code: number): string;

/** A decoded frame: `type`, `name` and the frame's fields (wire names, snake_case). */
export interface Frame { type: number; name: string; [field: string]: unknown }

export interface Message {
  position: Int; msg_id: Uint8Array; conv: string; seq: Int; sender: string; device: string;
  client_time: Int; server_time: Int; payload: Uint8Array; kind: number; local_id: Int; after_seq: Int;
  /** RECALL / EDIT / DELETE entries: the seq of the message they act on (0 otherwise). */
  target: Int;
  /** A message: server time (µs) of its latest edit, 0 = never edited. */
  edited: Int;
  /** A message: recalled (a tombstone, payload empty). */
  recalled: boolean;
  /** A message in a history page: deleted by this user for themselves (payload empty). */
  deleted: boolean;
  mentions: { user: string }[]; mention_all: boolean;
}
/** One entry of the conversation list (ConvEntry, PROTOCOL.md section 4). */
/**
 * One conversation of the user's list (listConversations, 'conversation' events): `last` the last message as history
 * returns it to this user (deleted for oneself: `deleted`, no payload), never behind the copy view() holds;
 * `last_seq` its seq (0 if none) -- not ReadState's `last_seq`, the conversation's last seq with RECALL/EDIT entries.
 */
export interface ConvEntry {
  conv: string; last: Message[]; read_seq: Int; last_seq: Int; unread: Int; mention_count: Int;
  pinned: boolean; muted: boolean; hidden: boolean;
}
export declare const Setting: Readonly<{ KEEP: 0; ON: 1; OFF: 2 }>;
/** `last_seq`: the conversation's last seq (RECALL/EDIT entries included), not a ConvEntry's. */
export interface ReadState { conv: string; read_seq: Int; last_seq: Int; unread: Int }
export interface Reader { user: string; read_seq: Int }
/** A user's presence: `last_seen` µs of the broker's clock, 0 while online, hidden by the user, or unknown. */
export interface PresenceEntry { user: string; state: 0 | 1 | 2; last_seen: Int }
/** A typing indicator: `expires` µs of the device clock (0 when it stopped). */
export interface TypingEvent { conv: string; user: string; active: boolean; expires: number }

export declare class ProtocolError extends Error { code: number; frames?: Frame[] }
export declare class EncodeError extends TypeError {}
export declare function encodeBody(frame: Frame): Uint8Array;
export declare function encodeFrame(frame: Frame): Uint8Array;
export declare function frameBytes(type: number, body: Uint8Array, flags?: number): Uint8Array;
export declare function decodeBody(type: number, body: Uint8Array): Frame;
export declare function frame(name: string, fields: Record<string, unknown>): Frame;
export declare function directConv(a: string, b: string): string;
/** The two users of a well-formed direct (1:1) conversation id, else null. */
export declare function directMembers(conv: string): [string, string] | null;
/** Why `conv` is not a valid conversation id, in words (as pimcore.ids.conversation_problem), or null. */
export declare function conversationProblem(conv: unknown): string | null;
/** A value quoted for a message ('...'), cut short past 70 characters. */
export declare function showValue(v: unknown): string;
export declare class FrameDecoder {
  constructor(options?: { maxFrameSize?: number });
  maxFrameSize: number;
  /** Set once downstream compression is active: (zbody, maxBytes) -> body. */
  inflate: ((zbody: Uint8Array, maxBytes: number) => Uint8Array) | null;
  push(data: Uint8Array): void;
  next(): Frame | null;
  feed(data: Uint8Array): Frame[];
}

export interface Orderable {
  sender: string; device: string; local_id: Int; after_seq: Int; seq: Int;
  client_time: Int; server_time: Int; msg_id: Uint8Array;
}
export declare function interleave(items: Orderable[]): number[];
export declare function displayOrder<M extends Orderable>(messages: M[]): M[];

export interface Compression {
  caps: number;
  minBody?: number;
  createInflater(): (zbody: Uint8Array, maxBytes: number) => Uint8Array;
  createDeflater(): (body: Uint8Array) => Uint8Array;
}

export interface ClientOptions {
  url: string;
  /** A JWT (PROTOCOL.md section 8), or a function returning a fresh one at every (re)connect. An empty token, or one of another type, is a TypeError naming `token` from the constructor; a token function that returns one (at that connect) rejects `connect()` with that TypeError before the first login (the client ends), and is retried with the reconnect backoff after it. */
  token: string | Uint8Array | (() => string | Uint8Array | Promise<string | Uint8Array>);
  device?: string;
  /** The resume cursor (taken position) and the epoch it came from, as saved from a previous run. */
  position?: number;
  epoch?: Uint8Array | string | null;
  /** `deflateCompression` from '@pimcore/client/deflate', or null for Login.caps 0. */
  compression?: Compression | null;
  WebSocket?: unknown;
  ackTimeout?: number; sendTimeout?: number; connectTimeout?: number; ackDelay?: number; // ms
  timeSamples?: number; backoffInitial?: number; backoffMax?: number; deadAfter?: number;
  viewLimit?: number; reconnect?: boolean;
  /** ms: while the user types, typing() sends at most one Typing per conversation per interval (default 2500). */
  typingInterval?: number;
  /** The device clock in µs (default: the wall clock at the client's creation plus performance.now() elapsed since, so a wall clock stepped while the client runs is not seen); fractions are floored. Stamps and local ids use it as read; timers run on a copy that never goes backwards (a backward step is absorbed, a forward step fires the timers it jumps over). */
  now?: () => number;
}

/** A message payload: bytes as a Uint8Array, an ArrayBuffer or any ArrayBuffer view (DataView, typed array), or text sent as UTF-8.  Anything else rejects with EncodeError. */
export type Payload = Uint8Array | ArrayBuffer | ArrayBufferView | string;
export interface Sent { local_id: Int; conv: string; msg_id: Uint8Array; seq: Int; server_time: Int; client_time: Int }
export interface Connected { user: string; device: string; position: Int; gap: boolean; clockOffset: number; rtt: number; epoch: Uint8Array }

/** A refusal no call waits for (the `brokerRefused` event). */
export interface BrokerRefused { code: number; codeName: string; ref: Int; reason: string }

export interface ClientEvents {
  connected: Connected;
  disconnected: { code: number | null; reason: string };
  message: Message;
  /** A RECALL / EDIT / DELETE entry, and the changed message as held (null if not held). */
  amended: { entry: Message; message: Message | null };
  sent: Sent;
  readstate: ReadState;
  receipt: { conv: string; reader: string; seq: Int };
  conversation: ConvEntry;
  /** The host purged `conv`: its messages up to `last_seq` left `view(conv)` (an app that stores messages deletes its copies); `gone`: the conversation no longer exists (a group; its read state was dropped; if created again, its seqs continue after `last_seq`). A 1:1 chat stays. Told while online (ConvPurged); at a login for each conversation of the user's list purged since this client last heard of it (`gone` false; once per purge point in a running client, again after an app restart: deleting up to `last_seq` again changes nothing); and at the login after a purge that took the conversation out of the user's list (`last_seq`: the last seq this client knew). */
  purged: { conv: string; last_seq: Int; gone: boolean };
  resynced: { oldEpoch: Uint8Array; epoch: Uint8Array; position: Int };
  sendsStalled: { code: number; pending: number; since: number };
  sendsResumed: { since: number; pending: number };
  /** Every Error frame from the broker, as it came (including the one explaining a send's refusal, whose SendError carries its reason, and TYPING_NOT_RELAYED). Most apps want `brokerRefused`. */
  error: { code: number; ref: Int; reason: string };
  /** The broker refused a request the client cannot tie to a call (its Error names no pending send; `ref` 0): a refused `markRead` of a group (NOT_MEMBER, UNKNOWN_CONVERSATION; `reason` names the conversation), a marker not saved (STORE_UNAVAILABLE), a refused `typing` (NOT_MEMBER). `codeName` is the ErrorCode's name ('NOT_MEMBER'), or the number as text for a code this client does not know. TYPING_NOT_RELAYED (expected in large groups) is not one. The Python SDK's BrokerRefused. */
  brokerRefused: BrokerRefused;
  closed: Error;
  state: State;
  /** Another member started or stopped typing (an indicator also stops by itself at `expires`). */
  typing: TypingEvent;
  /** A subscribed user's presence: the subscription's answer, then every change; right after `disconnected`, and on close() or a terminal error, UNKNOWN (last_seen kept) for every entry that was not. */
  presence: PresenceEntry;
  /** This user's last-seen privacy setting as the broker has it. */
  privacy: { hideLastSeen: boolean };
}

export type State = 'DISCONNECTED' | 'AWAITING_LOGIN_ACK' | 'CALIBRATING' | 'ACTIVE' | 'CLOSED';
export declare const State: Readonly<Record<State, State>>;

export declare class PimcoreClient {
  constructor(options: ClientOptions);
  readonly device: string;
  readonly user: string | null;
  readonly state: State;
  readonly error: Error | null;
  /** Resume cursor: save with `epoch` to resume after a restart. */
  readonly takenUpto: number;
  readonly ackedUpto: number;
  readonly epoch: Uint8Array;
  readonly clockOffset: number;
  readonly rtt: number;
  readonly compressionCaps: number;
  readonly sendWindow: number;
  on<K extends keyof ClientEvents>(name: K, fn: (ev: ClientEvents[K]) => void): () => void;
  connect(): Promise<Connected>;
  close(): Promise<void>;
  dropConnection(reason?: string): void;
  reconnectNow(): void;
  /** `localId`: a safe integer (number), or a BigInt up to 2**64-1 (a number above 2**53-1 is a RangeError: it holds no exact integer); by default the client's own. With the `localId` of a send still pending: the same message (conv, payload, mentions in any order, mentionAll) is a retry and gets that send's promise; a different one (or the localId of a pending amend) rejects at once, nothing sent, with an Error "local id N is still pending with a different message" (likewise for amend, recall, edit and deleteForMe). */
  send(conv: string, payload: Payload, options?: { localId?: Int; timeout?: number; mentions?: string[]; mentionAll?: boolean }): Promise<Sent>;
  /** Rejects at once (nothing sent) with RangeError for a `target` that is not an integer in 1..2**64-1 (TypeError if no number or bigint); so do recall, edit and deleteForMe for their `seq`. */
  amend(conv: string, target: Int, action: number, payload?: Payload, options?: { localId?: Int; timeout?: number }): Promise<Sent>;
  recall(conv: string, seq: Int, options?: { localId?: Int; timeout?: number }): Promise<Sent>;
  edit(conv: string, seq: Int, payload: Payload, options?: { localId?: Int; timeout?: number }): Promise<Sent>;
  deleteForMe(conv: string, seq: Int, options?: { localId?: Int; timeout?: number }): Promise<Sent>;
  pendingSends(): number[];
  /**
   * Move the read marker (never back); re-sent until confirmed.  Throws, nothing sent: RangeError for a `seq` not an
   * integer in 0..2**64-1 (TypeError if no number or bigint), SendError(BAD_REQUEST) for a malformed conversation id,
   * SendError(NOT_MEMBER) for a 1:1 id without this user.  The broker's refusal of a group comes as `brokerRefused`.
   */
  markRead(conv: string, seq: Int): void;
  readState(conv: string): ReadState | undefined;
  unread(conv: string): number;
  conversations(): ReadState[];
  receipt(conv: string, reader: string): number;
  /** Rejects with RangeError for a `fromSeq` outside 0..2**64-1 or a `limit` < 1 (TypeError if no number or bigint); listConversations likewise for `limit`. */
  history(conv: string, options?: { fromSeq?: Int; limit?: number; backward?: boolean; timeout?: number }): Promise<{ messages: Message[]; more: boolean }>;
  readers(conv: string, options?: { timeout?: number }): Promise<Reader[]>;
  listConversations(options?: { cursor?: Uint8Array; limit?: number; includeHidden?: boolean; timeout?: number }): Promise<{ entries: ConvEntry[]; cursor: Uint8Array; more: boolean }>;
  setConversation(conv: string, options?: { pinned?: boolean; muted?: boolean; hidden?: boolean; timeout?: number }): Promise<void>;
  view(conv: string): Message[];
  serverNow(): number;
  /** The user is typing in `conv` (or stopped); throttled to one frame per `typingInterval`. Returns whether one went out. */
  typing(conv: string, active?: boolean): boolean;
  typingUsers(conv: string): string[];
  /** Replace the presence subscription; resolves with every asked user's state. Rejects with SendError(PRESENCE_LIMIT), RequestTimeout. */
  subscribePresence(users: Iterable<string>, options?: { timeout?: number }): Promise<Record<string, PresenceEntry>>;
  /** Hide (true) / show (false) this user's last-seen time, or ask (null); resolves with the setting in force. */
  setPresencePrivacy(hideLastSeen: boolean | null, options?: { timeout?: number }): Promise<boolean>;
  /** The latest presence of each subscribed user as far as the client can know it: every entry UNKNOWN (last_seen kept) while disconnected and once closed. */
  readonly presence: Map<string, PresenceEntry>;
  readonly hideLastSeen: boolean | null;
}

export declare class SendError extends Error { code: number; reason: string }
export declare class SendTimeout extends Error { localId: Int }
/** For a send pending at close, `localId` is its local id (the message may have been stored: send again with it); null otherwise. */
export declare class ClientClosed extends Error { localId: Int | null }
export declare class AuthFailed extends Error {}
/** The first connection failed: a URL not ws:// or wss://, a refused WebSocket upgrade (HTTP 404: the wrong path), in Node a refused port or an unknown host, or no login within connectTimeout (the last attempt's reason). The client ends. */
export declare class ConnectFailed extends Error {}
export declare class RequestTimeout extends Error {}
/** The `disconnected` reason when frames kept coming but the heartbeat Ping got no Pong (the way up is dead). */
export declare const NO_HEARTBEAT_ANSWER: string;
/** The broker's limit on a frame before it grants the Login (64 KiB): connect() refuses a token whose Login is over it. */
export declare const PRE_LOGIN_MAX_FRAME: number;
export declare function toHex(b: Uint8Array): string;
export declare function fromHex(s: string): Uint8Array;
