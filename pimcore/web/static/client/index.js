export * from './codec.js';
export { interleave, displayOrder } from './order.js';
export {
  PimcoreClient, State, SendError, SendTimeout, ClientClosed, AuthFailed, ConnectFailed, RequestTimeout, toHex, fromHex, NO_HEARTBEAT_ANSWER,
} from './client.js';
