export * from './codec.js';
export { interleave, displayOrder } from './order.js';
export {
  PimcoreClient, State, SendError, SendTimeout, ClientClosed, AuthFailed, ConnectFailed, RequestTimeout, toHex, fromHex, NO_HEARTBEAT_ANSWER, PRE_LOGIN_MAX_FRAME,
} from './client.js';
