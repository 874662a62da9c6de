// Types of progress-relay.js, the browser client of progress-relay.

/** An event as the relay delivers it: the emitted object with `seq` added. */
export interface RelayEvent {
  seq: number;
  topic: string;
  type?: string;
  [field: string]: unknown;
}

/** `type: "progress"` (the emitters' helpers write these fields). */
export interface TaskProgressEvent extends RelayEvent {
  type: 'progress';
  progress?: number;
  current?: number;
  total?: number;
  message?: string;
  status?: string;
}

/** `type: "complete"`. */
export interface TaskCompleteEvent extends RelayEvent {
  type: 'complete';
  success?: boolean;
  message?: string;
  result?: unknown;
}

/** `type: "error"`. */
export interface TaskErrorEvent extends RelayEvent {
  type: 'error';
  error?: string;
  details?: unknown;
}

/** What comes with each event. */
export interface EventInfo {
  topic: string;
  seq: number;
  /** True when events of this topic were missed before this one (the relay could not fill
   * the gap, renumbered the topic, or reset its stream): this event is the newest state. */
  gap: boolean;
  /** The topic or pattern of the subscription that delivered it. */
  subscription: string;
  /** True when the client gave a new listener the newest event it had already received. */
  cached: boolean;
}

export type SubscriptionStatus =
  | {
      status: 'subscribed';
      topic: string;
      /** null for a pattern */
      epoch: string | null;
      /** the topic's newest seq at subscribe time (0 for a pattern) */
      seq: number;
      /** the relay replayed every missed event */
      recovered: boolean;
      /** the client asked to resume (it had an epoch and a seq); `resumed && !recovered`
       * means events were missed and the next one is the newest state */
      resumed: boolean;
    }
  | {
      /** The relay reset this live subscription's stream (cluster mode: Redis lost or may have
       * rolled back the topic, or a gap could not be repaired from history). The client now
       * follows `epoch` from `seq`, and its next resume uses them; the events the relay holds
       * after `seq` follow, the first with `info.gap = true`. Events before them may have been
       * missed, and seqs start again under a new epoch. The subscription stays. */
      status: 'reset';
      topic: string;
      epoch: string;
      /** where the new numbering stands before the events that follow (0: from its start) */
      seq: number;
      recovered: false;
      /** the numbering the client followed until now (null if it had none) */
      previousEpoch: string | null;
      /** the last seq the client delivered in that numbering */
      previousSeq: number;
    }
  | { status: 'ended'; topic: string; reason: string }
  | { status: 'error'; topic: string; code: string; message?: string };

/** `idle`: before the first connect (`relay.state` only; no `state` event carries it). */
export type ConnectionState = 'idle' | 'connecting' | 'open' | 'closed';

export interface StateChange {
  state: ConnectionState;
  /** reconnect attempts since the last healthy connection */
  attempt?: number;
  /** ms until the next attempt (while waiting to reconnect) */
  delay?: number;
  /** close code of the connection that ended (1006 when none was received); on SSE, 4401 when
   * the relay refused the token (HTTP 401) */
  code?: number;
  reason?: string;
  /** the client stopped for good (4403, protocol errors, a refused token without getToken) */
  fatal?: boolean;
}

export interface RelayError {
  /** relay error codes (`unauthorized`, `forbidden`, `bad_request`, `unknown_op`,
   * `too_many_subscriptions`; on SSE, those of the JSON body of a refused stream) or the
   * client's own: `token` (getToken failed), `protocol`, `bad_url` */
  code: string;
  message?: string;
  topic?: string;
  closeCode?: number;
  fatal?: boolean;
  error?: unknown;
}

export interface TokenChange {
  token: string | null;
  /** the token's `exp` (seconds since 1970), when it has one */
  exp: number | null;
  /** true when the relay accepted it on the open connection (`refreshed`) */
  refreshed?: boolean;
}

/** What `getToken` gives: the token, or a token endpoint's JSON answer with the token in
 * `token` (other fields, such as `topic` and `url`, are ignored). */
export type TokenAnswer = string | { token: string; [field: string]: unknown };

export interface ProgressRelayOptions {
  /** A token to start with. */
  token?: string;
  /** Gives a fresh token: called on start without `token`, after close 4401, and before
   * `exp` to refresh the open connection. A token, or an object whose `token` is one (a token
   * endpoint's JSON answer, `{"token": "<JWT>", ...}`), or a promise of either. */
  getToken?: () => TokenAnswer | Promise<TokenAnswer>;
  /** ms; the client sends {"op":"ping"} after half an interval of silence and reconnects
   * after two intervals without any frame. 0 turns it off. Default: the relay's
   * `--ping-interval` (the `ping_interval` of a connection's first `subscribed` frame), 25000
   * until it is known; a value given here is kept. */
  pingInterval?: number;
  /** first reconnect delay in ms, before jitter. Default 500. */
  minDelay?: number;
  /** longest reconnect delay in ms. Default 30000. */
  maxDelay?: number;
  /** ms a handshake may take. Default 10000. */
  connectTimeout?: number;
  /** refresh this long before `exp` at most (and at 3/4 of a shorter token's life), ms;
   * 0 turns refresh off (the relay then closes with 4401 at `exp` and the client reconnects
   * with a token from getToken). Default 30000. */
  refreshBefore?: number;
  /** connect at once (default true); otherwise call connect(). */
  autoConnect?: boolean;
  /** how the token reaches the relay: `'protocol'` (default) offers it as the WebSocket
   * subprotocol `bearer.<JWT>` beside `progress-relay.v1`, out of the URL and so out of proxy
   * logs; `'query'` puts it in `?token=` (relays without the subprotocol). */
  tokenTransport?: 'protocol' | 'query';
  /** `'auto'` (default): the WebSocket, and server-sent events (`GET /sse`, one EventSource per
   * subscription) after 2 handshakes in a row failed, each while the host answered
   * HTTP (a proxy that refuses upgrades); `'websocket'`: never SSE; `'sse'`: SSE only. */
  transport?: TransportOption;
  /** the relay's `GET /sse` URL; by default the WebSocket URL's last segment `ws` replaced by `sse`. */
  sseUrl?: string | URL | null;
}

export type TransportOption = 'auto' | 'websocket' | 'sse';
export type Transport = 'websocket' | 'sse';

export interface TransportChange {
  transport: Transport;
  /** why `auto` switched to SSE */
  reason?: string;
}

export interface SubscribeOptions {
  onStatus?: (status: SubscriptionStatus) => void;
}

export interface ProgressRelayEvents {
  state: StateChange;
  subscription: SubscriptionStatus;
  error: RelayError;
  token: TokenChange;
  transport: TransportChange;
}

/** The subprotocol the relay selects: `progress-relay.v1`. */
export declare const SUBPROTOCOL: 'progress-relay.v1';

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  PROTOCOL_ERROR: 1002;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  INVALID_PAYLOAD: 1007;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  TRY_AGAIN_LATER: 1013;
  UNAUTHORIZED: 4401;
  FORBIDDEN: 4403;
}>;

export declare class ProgressRelay {
  /** `url`: `wss://host/ws`, or `https://host/ws`, or relative to the page (`/ws`). */
  constructor(url: string | URL, options: ProgressRelayOptions);
  readonly url: URL;
  readonly state: ConnectionState;
  readonly token: string | null;
  /** the transport in use: `'websocket'` (with `auto`, until it falls back) or `'sse'` */
  readonly transport: Transport;
  /** topics and patterns subscribed */
  readonly topics: string[];
  /** Returns a function that unsubscribes this listener. */
  subscribe<E extends RelayEvent = RelayEvent>(
    topic: string,
    onEvent: (event: E, info: EventInfo) => void,
    options?: SubscribeOptions,
  ): () => void;
  /** Returns a function that removes the handler. */
  on<K extends keyof ProgressRelayEvents>(name: K, handler: (value: ProgressRelayEvents[K]) => void): () => void;
  connect(): void;
  close(): void;
}

/** The reconnect delay for attempt n (0-based): equal jitter over min(maxDelay, minDelay·2ⁿ). */
export declare function backoffDelay(attempt: number, minDelay?: number, maxDelay?: number): number;
/** A JWT's claims, decoded but not verified; null when it is not a JWT. */
export declare function decodeJwtPayload(token: string | null | undefined): Record<string, unknown> | null;
/** Whether a grant or subscription (`X` or `P*`) covers `topic`. */
export declare function topicMatches(pattern: string, topic: string): boolean;
