// SystemAccounts: user and group names through NSS (getpwnam_r, getgrnam_r, getpwuid_r).
//
// NSS may ask a directory service (LDAP, SSSD, systemd-homed) and block for
// seconds, so no event loop ever calls it. Names in `--publish-grant` are
// resolved once at start, before anything serves. `{user}` needs the name of
// each connecting uid: `UserNameCache` looks it up on NIO's thread pool before
// the connection's channel exists (so before its first line is read), and
// keeps the answer, a missing entry included, for a minute.

#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

public enum SystemAccounts {
    /// The uid of user `name`, or nil when there is no such user. Blocking: call it at start or on a thread.
    public static func uid(ofUser name: String) -> UInt32? {
        withBuffer { buffer in
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>?
            let code = getpwnam_r(name, &entry, buffer.baseAddress!, buffer.count, &result)
            return (code, result == nil ? nil : entry.pw_uid)
        }
    }

    /// The gid of group `name`, or nil when there is no such group. Blocking.
    public static func gid(ofGroup name: String) -> UInt32? {
        withBuffer { buffer in
            var entry = group()
            var result: UnsafeMutablePointer<group>?
            let code = getgrnam_r(name, &entry, buffer.baseAddress!, buffer.count, &result)
            return (code, result == nil ? nil : entry.gr_gid)
        }
    }

    /// The passwd name of `uid`, or nil when it has none. Blocking.
    public static func userName(ofUID uid: UInt32) -> String? {
        withBuffer { buffer in
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>?
            let code = getpwuid_r(uid, &entry, buffer.baseAddress!, buffer.count, &result)
            return (code, result == nil || entry.pw_name == nil ? nil : String(cString: entry.pw_name!))
        }
    }

    /// Runs a `get*_r` call with a buffer that grows while the call answers ERANGE (large groups).
    private static func withBuffer<T>(_ body: (UnsafeMutableBufferPointer<CChar>) -> (Int32, T?)) -> T? {
        var size = 4096
        while size <= 1 << 24 {
            let buffer = UnsafeMutableBufferPointer<CChar>.allocate(capacity: size)
            defer { buffer.deallocate() }
            let (code, value) = body(buffer)
            if code == ERANGE {
                size *= 4
                continue
            }
            return code == 0 ? value : nil
        }
        return nil
    }
}

/// uid → passwd name for `{user}`, filled off the event loops.
final class UserNameCache: Sendable {
    private struct Entry {
        var name: String?
        var expires: NIODeadline
    }

    private let entries = NIOLockedValueBox<[UInt32: Entry]>([:])
    private let lifetime: TimeAmount
    private let capacity: Int
    private let lookup: @Sendable (UInt32) -> String?

    init(
        lifetime: TimeAmount = .seconds(60), capacity: Int = 4096,
        lookup: @escaping @Sendable (UInt32) -> String? = SystemAccounts.userName(ofUID:)
    ) {
        self.lifetime = lifetime
        self.capacity = capacity
        self.lookup = lookup
    }

    /// The name of `uid`: at once from the cache, else looked up on the thread pool.
    func name(of uid: UInt32, on loop: any EventLoop) -> EventLoopFuture<String?> {
        let now = NIODeadline.now()
        if let hit = entries.withLockedValue({ $0[uid] }), hit.expires > now {
            return loop.makeSucceededFuture(hit.name)
        }
        let lookup = self.lookup
        return NIOThreadPool.singleton.runIfActive(eventLoop: loop) { lookup(uid) }.map { [self] name in
            let entry = Entry(name: name, expires: .now() + lifetime)
            entries.withLockedValue { entries in
                if entries.count >= capacity { entries.removeAll(keepingCapacity: true) }
                entries[uid] = entry
            }
            return name
        }
    }
}
