// PublishGrants: which topics an emitter connection may publish to
// (`--publish-grant WHO=PATTERN`), decided from the kernel's word about who
// connected (SO_PEERCRED, SO_PEERGROUPS), never from anything the emitter says.
//
// WHO is `uid:N`, `user:NAME`, `gid:N`, `group:NAME` or `*`; PATTERN has the
// subscriber grants' syntax (a topic, or a prefix ending in `*`) and may use
// `{uid}` and `{user}`. Names are resolved once at start (`resolved`), so a
// rule holds numbers only; a connection's grants are computed once, when it is
// accepted, into a GrantSet that every line is checked against.

/// `--publish-grant WHO=PATTERN` as written, names not yet resolved.
public struct PublishGrantSpec: Sendable, Equatable {
    public enum Who: Sendable, Equatable {
        case uid(UInt32)
        case user(String)
        case gid(UInt32)
        case group(String)
        case anyone
    }

    public var who: Who
    public var pattern: String

    /// Parses `WHO=PATTERN`; the error says what is wrong, for a one-line message.
    public init(parsing text: String) throws(PublishGrantError) {
        // WHO never holds `=`; a topic may, so the first `=` ends WHO.
        guard let equals = text.firstIndex(of: "=") else {
            throw .malformed("expected WHO=PATTERN, e.g. group:celery=task:* (WHO: uid:N, user:NAME, gid:N, group:NAME or *)")
        }
        let whoText = String(text[..<equals])
        pattern = String(text[text.index(after: equals)...])
        switch whoText {
        case "*":
            who = .anyone
        case let value where value.hasPrefix("uid:"):
            guard let id = Self.id(value.dropFirst(4)) else { throw .malformed("uid:N needs a number N (0 to 4294967294)") }
            who = .uid(id)
        case let value where value.hasPrefix("gid:"):
            guard let id = Self.id(value.dropFirst(4)) else { throw .malformed("gid:N needs a number N (0 to 4294967294)") }
            who = .gid(id)
        case let value where value.hasPrefix("user:"):
            guard value.count > 5 else { throw .malformed("user:NAME needs a user name") }
            who = .user(String(value.dropFirst(5)))
        case let value where value.hasPrefix("group:"):
            guard value.count > 6 else { throw .malformed("group:NAME needs a group name") }
            who = .group(String(value.dropFirst(6)))
        default:
            throw .malformed("unknown WHO \"\(whoText)\": expected uid:N, user:NAME, gid:N, group:NAME or *")
        }
        guard PublishGrantTemplate.isValid(pattern) else {
            throw .malformed(
                "\"\(pattern)\" is not a topic or a prefix pattern ending in * ({uid} and {user} may be used), e.g. task:* or user:{user}:*")
        }
    }

    /// A decimal id; `(uid_t)-1` is no one's id (chown's "leave alone").
    private static func id(_ text: Substring) -> UInt32? {
        guard !text.isEmpty, text.allSatisfy(\.isASCII), let value = UInt32(text), value != UInt32.max else { return nil }
        return value
    }

    /// The rule with names turned into ids by the lookups given (the system's at start; fakes in tests).
    public func resolved(
        uidOfUser: (String) -> UInt32?, gidOfGroup: (String) -> UInt32?
    ) throws(PublishGrantError) -> PublishGrantRule {
        let subject: PublishGrantRule.Subject
        switch who {
        case .uid(let id): subject = .uid(id)
        case .gid(let id): subject = .gid(id)
        case .anyone: subject = .anyone
        case .user(let name):
            guard let id = uidOfUser(name) else { throw .unknownName("no user named \"\(name)\"") }
            subject = .uid(id)
        case .group(let name):
            guard let id = gidOfGroup(name) else { throw .unknownName("no group named \"\(name)\"") }
            subject = .gid(id)
        }
        return PublishGrantRule(subject: subject, template: PublishGrantTemplate(checked: pattern))
    }
}

public enum PublishGrantError: Error, Sendable, Equatable, CustomStringConvertible {
    case malformed(String)
    case unknownName(String)

    public var description: String {
        switch self {
        case .malformed(let why), .unknownName(let why): return why
        }
    }
}

/// A publish grant's PATTERN: a topic or prefix pattern that may hold `{uid}` and `{user}`.
public struct PublishGrantTemplate: Sendable, Equatable {
    public let template: String
    public let usesUserName: Bool

    static func isValid(_ template: String) -> Bool {
        let probe = template.replacing("{uid}", with: "0").replacing("{user}", with: "x")
        return TopicName.isValidTopicOrPattern(probe)
    }

    init(checked template: String) {
        self.template = template
        usesUserName = template.contains("{user}")
    }

    public init?(_ template: String) {
        guard Self.isValid(template) else { return nil }
        self.init(checked: template)
    }

    /// The grant for one connection, or nil when `{user}` has no value (a uid without a passwd
    /// entry) or one that is no topic text (it must never widen or break the grant).
    public func grant(uid: UInt32, userName: String?) -> String? {
        var grant = template.replacing("{uid}", with: String(uid))
        if usesUserName {
            guard let userName, !userName.isEmpty, userName.utf8.allSatisfy(TopicName.isTopicByte) else { return nil }
            grant = grant.replacing("{user}", with: userName)
        }
        return TopicName.isValidTopicOrPattern(grant) ? grant : nil
    }
}

/// One `--publish-grant` with its names resolved.
public struct PublishGrantRule: Sendable, Equatable {
    public enum Subject: Sendable, Equatable {
        case uid(UInt32)
        case gid(UInt32)
        case anyone
    }

    public var subject: Subject
    public var template: PublishGrantTemplate

    public init(subject: Subject, template: PublishGrantTemplate) {
        self.subject = subject
        self.template = template
    }
}

/// Who connected, as the kernel says (the credentials of whoever called `connect()`).
public struct PublisherIdentity: Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups; nil when they could not be read (then no group rule applies).
    public var groups: [UInt32]?
    /// The uid's passwd name, when a rule needs `{user}` and there is one.
    public var userName: String?

    public init(uid: UInt32, gid: UInt32, groups: [UInt32]?, userName: String? = nil) {
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.userName = userName
    }
}

/// Every `--publish-grant` of the relay. Without any, the relay has no policy (nil) and takes
/// every topic, as before; with one or more, a topic no grant of the connection covers is refused.
public struct PublishPolicy: Sendable, Equatable {
    public let rules: [PublishGrantRule]

    public init(rules: [PublishGrantRule]) {
        self.rules = rules
    }

    /// Whether some rule uses `{user}`: then the uid's name is needed before the connection is read.
    public var needsUserName: Bool { rules.contains { $0.template.usesUserName } }

    /// Whether some rule names a group: then the supplementary groups are read.
    public var needsGroups: Bool { rules.contains { if case .gid = $0.subject { true } else { false } } }

    /// The grants of one connection.
    public func grants(for identity: PublisherIdentity) -> GrantSet {
        var grants = [String]()
        for rule in rules {
            let applies: Bool
            switch rule.subject {
            case .anyone: applies = true
            case .uid(let uid): applies = identity.uid == uid
            case .gid(let gid):
                // Unreadable supplementary groups: group grants do not apply at all.
                if let groups = identity.groups {
                    applies = identity.gid == gid || groups.contains(gid)
                } else {
                    applies = false
                }
            }
            if applies, let grant = rule.template.grant(uid: identity.uid, userName: identity.userName) {
                grants.append(grant)
            }
        }
        return GrantSet(grants)
    }
}
