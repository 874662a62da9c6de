// IngestListener: the Unix socket emitters connect to, and their connections.
//
// The relay accepts ingest connections itself (see Acceptor) rather than
// through NIO's ServerBootstrap, because shutdown must shut down only the
// reading side of each emitter connection with `shutdown(fd, SHUT_RD)` and
// then read what was already written: NIO's `close(mode: .input)` stops
// reading at once and would drop those lines. So each descriptor's number is
// kept, with its channel, for that shutdown.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import RelayHub

/// Who connected to an ingest connection, from `SO_PEERCRED` and `SO_PEERGROUPS`: the
/// credentials of the process that called `connect()`, captured by the kernel then (a descriptor
/// handed on keeps them). The pid is for logs only: it may be reused, or be a parent's.
struct PeerCredentials: Sendable, CustomStringConvertible {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32 = UInt32.max
    /// Supplementary groups, read only when a `--publish-grant` names a group; nil otherwise or
    /// when the kernel would not give them.
    var groups: [UInt32]? = nil
    /// The topics this connection may publish to, computed once when it is accepted; nil without
    /// `--publish-grant` (every topic).
    var grants: GrantSet? = nil
    /// The accepted socket, owned by the connection's channel: a drain (idle, partial line,
    /// shutdown) shuts its reading side with `shutdown(2)`, which NIO does not offer.
    var descriptor: CInt = -1

    var description: String { "pid \(pid) uid \(uid) gid \(gid)" }
}

public enum IngestSocketError: Error, CustomStringConvertible {
    case pathTooLong(String)
    case inUse(String)
    case notASocket(String)
    /// What is at the path right after `bind` is not the socket this process made.
    case replacedWhileBinding(String)
    /// The socket file answers with an error other than "nobody listens": it may be live and
    /// another user's, so it is left alone.
    case cannotProbe(String, SystemCallError)
    /// A call failed while binding `--socket`.
    case system(String, SystemCallError)

    public var description: String {
        switch self {
        case .pathTooLong(let path):
            return "--socket \(path): path is too long for a Unix socket (at most 107 bytes)"
        case .inUse(let path): return "--socket \(path): another process is already listening there (is a relay running?)"
        case .notASocket(let path): return "--socket \(path): exists and is not a socket; refusing to replace it"
        case .replacedWhileBinding(let path):
            return "--socket \(path): the file was replaced while the relay bound it; refusing to set its mode"
        case .cannotProbe(let path, let error):
            return "--socket \(path): in use by someone else or not reachable (\(error.reason)); refusing to replace it"
        case .system(let path, let error):
            if error.call == "bind", error.code == ENOENT {
                return "--socket \(path): the directory \((path as NSString).deletingLastPathComponent) does not exist"
            }
            let purpose = ["unlink": "removing the stale socket file: ", "fchmodat": "setting the socket's mode: "]
            return "--socket \(path): \(purpose[error.call] ?? "")\(error.call) failed: \(error.reason)"
        }
    }
}

/// The per-turn read budget of one emitter connection (see `serve`).
enum IngestReads {
    static let maxReadsPerTurn: UInt = 4
    static let maxReadBytes = 64 * 1024
}

final class IngestListener: Sendable {
    let path: String?
    /// Device and inode of the socket file this process bound: at shutdown the file is removed
    /// only if it is still that one (another relay may have replaced it meanwhile).
    private let boundFile: (device: UInt64, inode: UInt64)?
    private let acceptor: Acceptor
    private let connections = NIOLockedValueBox<[ObjectIdentifier: (descriptor: CInt, channel: any Channel)]>([:])
    /// `--max-emitters` and the per-uid shares, set by `start`.
    private let limits = NIOLockedValueBox<EmitterLimits?>(nil)

    private init(descriptor: CInt, path: String?, boundFile: (device: UInt64, inode: UInt64)? = nil) throws {
        self.path = path
        self.boundFile = boundFile
        acceptor = try Acceptor(descriptor: descriptor, name: "ingest-accept")
    }

    /// Binds `path`, replacing a stale socket file but never a live one, another user's, or a non-socket.
    static func bind(path: String, mode: UInt32) throws -> IngestListener {
        guard let address = UnixAddress(path) else { throw IngestSocketError.pathTooLong(path) }

        if let status = try? SystemCalls.lstat(path) {
            guard (status.st_mode & S_IFMT) == S_IFSOCK else { throw IngestSocketError.notASocket(path) }
            switch probe(address, path: path) {
            case .live: throw IngestSocketError.inUse(path)
            case .unknown(let error): throw IngestSocketError.cannotProbe(path, error)
            case .stale:
                do {
                    try SystemCalls.unlink(path)
                } catch {
                    if error.code != ENOENT { throw IngestSocketError.system(path, error) }
                }
            }
        }

        let fd: CInt
        do {
            fd = try SystemCalls.socket(AF_UNIX, SOCK_STREAM, .path(path))
        } catch {
            throw IngestSocketError.system(path, error)
        }
        do {
            try SystemCalls.bind(fd, to: address, path: path)
        } catch {
            SystemCalls.close(fd)
            throw IngestSocketError.system(path, error)
        }
        // The mode goes only to the socket just bound: `lstat` must show a socket of ours (a
        // symbolic link swapped in is not followed), and `fchmodat(AT_SYMLINK_NOFOLLOW)` changes
        // the file it opened without following a link either, so a link's target never gets it.
        guard let made = try? SystemCalls.lstat(path), (made.st_mode & S_IFMT) == S_IFSOCK, made.st_uid == geteuid()
        else {
            SystemCalls.close(fd)
            throw IngestSocketError.replacedWhileBinding(path)
        }
        let madeFile = (device: UInt64(made.st_dev), inode: UInt64(made.st_ino))
        do {
            try SystemCalls.fchmodat(path, mode: mode_t(mode))
            try SystemCalls.listen(fd, backlog: 4096, .path(path))
        } catch {
            SystemCalls.close(fd)
            unlinkIfStillSocket(path, madeFile)
            throw IngestSocketError.system(path, error)
        }
        return try IngestListener(descriptor: fd, path: path, boundFile: madeFile)
    }

    /// Removes `path` only when it is still the socket file with that device and inode.
    private static func unlinkIfStillSocket(_ path: String, _ file: (device: UInt64, inode: UInt64)) {
        if let status = try? SystemCalls.lstat(path), UInt64(status.st_dev) == file.device,
            UInt64(status.st_ino) == file.inode
        {
            try? SystemCalls.unlink(path)
        }
    }

    /// Uses a listening socket handed over by systemd; it is never closed or unlinked here.
    static func adopt(descriptor: CInt) throws -> IngestListener {
        try IngestListener(descriptor: descriptor, path: nil)
    }

    private enum Probe { case live, stale, unknown(SystemCallError) }

    /// Only "connection refused" (nobody listens) and "no such file" mean stale. Anything else,
    /// permission denied above all, may be another user's live relay.
    private static func probe(_ address: UnixAddress, path: String) -> Probe {
        do {
            let probe = try SystemCalls.socket(AF_UNIX, SOCK_STREAM, .path(path))
            defer { SystemCalls.close(probe) }
            try SystemCalls.connect(probe, to: address, path: path)
            return .live
        } catch where error.code == ECONNREFUSED || error.code == ENOENT {
            return .stale
        } catch {
            return .unknown(error)
        }
    }

    // MARK: Accepting

    /// Starts accepting; `configure` sets up each accepted connection's pipeline. With a
    /// `publishPolicy` (`--publish-grant`), each connection's grants are computed before its
    /// channel exists, so before its first line is read.
    /// With `limits`, accepting stops while `--max-emitters` connections are open.
    func start(
        group: any EventLoopGroup, logger: Logger, publishPolicy: PublishPolicy? = nil, limits: EmitterLimits? = nil,
        configure: @escaping @Sendable (any Channel, PeerCredentials) -> EventLoopFuture<Void>
    ) {
        self.limits.withLockedValue { $0 = limits }
        let userNames = publishPolicy?.needsUserName == true ? UserNameCache() : nil
        if publishPolicy != nil, let maps = Self.partialIDMaps() {
            logger.warning(
                "the relay runs in a user namespace that does not map every id: emitters' uids and groups outside it are seen as 65534 (nobody), and publish grants naming them never match (systemd: PrivateUsers=no)",
                metadata: ["maps": "\(maps)"])
        }
        // A bound socket is closed at shutdown, so what waits in its backlog is accepted and
        // drained first; an adopted one stays open and keeps its backlog for the next process.
        var mayAccept: (@Sendable () -> Bool)?
        if let limits { mayAccept = { limits.hasRoom } }
        acceptor.start(logger: logger, acceptingPendingOnStop: path != nil, mayAccept: mayAccept) { [self] connection in
            limits?.opened()
            var credentials = Self.credentials(of: connection)
            guard let publishPolicy else {
                return serve(connection, credentials: credentials, group: group, logger: logger, configure: configure)
            }
            if publishPolicy.needsGroups { credentials.groups = groups(of: connection, credentials: credentials, logger: logger) }
            let identity = PublisherIdentity(uid: credentials.uid, gid: credentials.gid, groups: credentials.groups)
            guard let userNames, credentials.uid != UInt32.max else {
                credentials.grants = publishPolicy.grants(for: identity)
                return serve(connection, credentials: credentials, group: group, logger: logger, configure: configure)
            }
            // `{user}`: the uid's name, from the cache or looked up on the thread pool (NSS may
            // block), never on an event loop and never on this accept thread.
            let loop = group.next()
            let peer = credentials
            return userNames.name(of: peer.uid, on: loop)
                .recover { _ in nil }
                .flatMap { [self] name in
                    var identity = identity
                    identity.userName = name
                    var credentials = peer
                    credentials.grants = publishPolicy.grants(for: identity)
                    return serve(connection, credentials: credentials, group: group, logger: logger, configure: configure)
                }
        }
    }

    private func serve(
        _ connection: CInt, credentials: PeerCredentials, group: any EventLoopGroup, logger: Logger,
        configure: @escaping @Sendable (any Channel, PeerCredentials) -> EventLoopFuture<Void>
    ) -> EventLoopFuture<Void> {
        // Fairness: every emitter connection lives on the hub's one loop, which reads each ready
        // connection once per turn, at most `maxMessagesPerRead` reads of at most the allocator's
        // maximum. 4 × 64 KiB caps what one flooding emitter gets read per turn at 256 KiB (16 ×
        // 256 KiB allowed 4 MiB), so the others wait at most that much parsing behind it.
        ClientBootstrap(group: group)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(.maxMessagesPerRead, value: IngestReads.maxReadsPerTurn)
            .channelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 16 * 1024, maximum: IngestReads.maxReadBytes)
            )
            .channelInitializer { channel in configure(channel, credentials) }
            .withConnectedSocket(connection)
            .map { channel in
                self.track(channel, descriptor: connection)
            }
            .recover { error in
                self.connectionEnded()
                logger.warning("could not serve an emitter connection", metadata: ["error": "\(error)"])
            }
    }

    /// The relay's uid and gid maps when they are not the whole identity map (a container, a
    /// systemd `PrivateUsers=yes` unit): the kernel reports peers in the relay's own namespace.
    private static func partialIDMaps() -> String? {
        var maps = [String]()
        for file in ["/proc/self/uid_map", "/proc/self/gid_map"] {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { continue }
            let lines = text.split(separator: "\n").map { $0.split(separator: " ").joined(separator: " ") }
            if lines != ["0 0 4294967295"] { maps.append("\((file as NSString).lastPathComponent): \(lines.joined(separator: "; "))") }
        }
        return maps.isEmpty ? nil : maps.joined(separator: ", ")
    }

    /// `struct ucred` from <sys/socket.h> (pid_t, uid_t, gid_t), which Glibc's module leaves out
    /// (it needs _GNU_SOURCE); `SO_PEERCRED` itself comes from the headers.
    private struct UCred {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    /// The connecting process's pid, uid and gid; uid and gid `UInt32.max` (no one) when unknown.
    /// The descriptor is at hand here, so `getsockopt` is called on it directly (NIO's
    /// `unsafeGetSocketOption` would need the channel, and drops the length the kernel returns).
    private static func credentials(of fd: CInt) -> PeerCredentials {
        var credentials = UCred()
        guard let length = try? SystemCalls.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, into: &credentials),
            length == MemoryLayout<UCred>.size
        else {
            return PeerCredentials(pid: -1, uid: UInt32.max, descriptor: fd)
        }
        return PeerCredentials(pid: credentials.pid, uid: credentials.uid, gid: credentials.gid, descriptor: fd)
    }

    /// Logged once per process: a connection whose supplementary groups could not be read.
    private let groupsWarned = NIOLockedValueBox(false)

    /// The supplementary groups of the connecting process (`SO_PEERGROUPS`, Linux 4.13+), exactly
    /// as many as the kernel reports (`getsockopt` returns the length, so no zero slot is taken for
    /// gid 0). 256 fit at first; on ERANGE the kernel says how many there are and the call is made
    /// once more with room for them. nil, with a warning logged once, when they cannot be read:
    /// then no group grant applies to that connection.
    private func groups(of fd: CInt, credentials: PeerCredentials, logger: Logger) -> [UInt32]? {
        var capacity = 256
        var failure: SystemCallError?
        for _ in 0..<2 {
            var groups = [UInt32](repeating: 0, count: capacity)
            var length = socklen_t(0)
            let result = groups.withUnsafeMutableBytes { buffer in
                Result { () throws(SystemCallError) in
                    try SystemCalls.getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, into: buffer, length: &length)
                }
            }
            switch result {
            case .success:
                return Array(groups.prefix(min(capacity, Int(length) / MemoryLayout<UInt32>.size)))
            case .failure(let error):
                failure = error
            }
            let needed = Int(length) / MemoryLayout<UInt32>.size
            guard failure?.code == ERANGE, needed > capacity, needed <= 65536 else { break }
            capacity = needed
        }
        let first = groupsWarned.withLockedValue { warned in
            defer { warned = true }
            return !warned
        }
        if first {
            logger.warning(
                "cannot read an emitter's supplementary groups: group grants do not apply to such connections (logged once)",
                metadata: ["pid": "\(credentials.pid)", "uid": "\(credentials.uid)", "error": "\(failure?.reason ?? "unknown")"])
        }
        return nil
    }

    private func track(_ channel: any Channel, descriptor: CInt) {
        let key = ObjectIdentifier(channel)
        connections.withLockedValue { $0[key] = (descriptor, channel) }
        channel.closeFuture.whenComplete { [connections] _ in
            _ = connections.withLockedValue { $0.removeValue(forKey: key) }
            self.connectionEnded()
        }
        // The channel may have closed before it was tracked.
        if !channel.isActive {
            _ = connections.withLockedValue { $0.removeValue(forKey: key) }
        }
    }

    /// One connection fewer against `--max-emitters`; the accept thread looks again when that made room.
    private func connectionEnded() {
        if limits.withLockedValue({ $0 })?.closed() == true { acceptor.nudge() }
    }

    // MARK: Stopping

    /// Stops accepting. A bound socket is closed and unlinked; an adopted one stays open for the next process.
    func stopAccepting() {
        // The path goes first, so new emitters fail to connect (and keep their lines) rather than
        // land in a backlog about to be closed.
        if let path, let boundFile { Self.unlinkIfStillSocket(path, boundFile) }
        acceptor.stop()
        if path != nil { SystemCalls.close(acceptor.descriptor) }
    }

    /// Closes the emitter connections still open after the drain.
    func closeConnections() -> [EventLoopFuture<Void>] {
        connections.withLockedValue { Array($0.values) }.map { entry in
            entry.channel.close(promise: nil)
            return entry.channel.closeFuture
        }
    }

    /// Shuts down the reading side of every emitter connection: their writers' next writes fail
    /// (so they resend elsewhere), and NIO still reads every byte written before, then end-of-file.
    /// The future completes when every emitter connection is closed.
    func drainConnections() -> [EventLoopFuture<Void>] {
        // Parked connections (a uid over its share) hold written lines too: they are read now.
        limits.withLockedValue { $0 }?.releaseAll()
        let live = connections.withLockedValue { Array($0.values) }
        return live.map { entry in
            let channel = entry.channel
            channel.eventLoop.execute {
                // On the channel's loop, an active channel still owns its descriptor.
                if channel.isActive { try? SystemCalls.shutdown(entry.descriptor, SHUT_RD) }
            }
            return channel.closeFuture
        }
    }
}
