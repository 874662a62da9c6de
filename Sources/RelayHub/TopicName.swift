// TopicName: what a topic, a pattern and a grant may look like.
//
// A topic is 1 to 256 bytes of `A-Z a-z 0-9 _ - . : / @ =`. A pattern is such
// a prefix followed by `*` (or `*` alone) and stands for every topic with that
// prefix. Grants use the same two shapes, so one matcher serves both.

public enum TopicName {
    public static let maximumLength = 256

    /// Whether `byte` may appear in a topic.
    @inlinable
    public static func isTopicByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "_"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: ":"),
            UInt8(ascii: "/"), UInt8(ascii: "@"), UInt8(ascii: "="):
            return true
        default:
            return false
        }
    }

    /// Whether `name` is a valid topic (no `*`).
    public static func isValidTopic(_ name: some StringProtocol) -> Bool {
        let utf8 = name.utf8
        return !utf8.isEmpty && utf8.count <= maximumLength && utf8.allSatisfy(isTopicByte)
    }

    /// Whether `name` is a valid topic or a valid prefix pattern such as `task:*` or `*`.
    public static func isValidTopicOrPattern(_ name: some StringProtocol) -> Bool {
        guard name.hasSuffix("*") else { return isValidTopic(name) }
        let prefix = name.utf8.dropLast()
        return prefix.count < maximumLength && prefix.allSatisfy(isTopicByte)
    }

    /// The prefix a pattern stands for, or nil when `name` is a plain topic.
    public static func patternPrefix(_ name: String) -> Substring? {
        name.hasSuffix("*") ? name.dropLast() : nil
    }
}

/// The topics and patterns one token may read.
///
/// Grant `X` covers `X` alone; grant `P*` covers every topic and every pattern
/// that starts with `P` (so `task:*` covers `task:42` and `task:4*`).
public struct GrantSet: Sendable, Equatable {
    public private(set) var exact: Set<String>
    public private(set) var prefixes: [String]

    /// Keeps only well-formed grants; a malformed one (bad characters, `*` not last) grants nothing.
    public init(_ grants: some Sequence<String>) {
        var exact = Set<String>()
        var prefixes = [String]()
        for grant in grants where TopicName.isValidTopicOrPattern(grant) {
            if let prefix = TopicName.patternPrefix(grant) {
                prefixes.append(String(prefix))
            } else {
                exact.insert(grant)
            }
        }
        self.exact = exact
        self.prefixes = prefixes
    }

    public var isEmpty: Bool { exact.isEmpty && prefixes.isEmpty }

    /// Whether a topic or pattern may be read.
    public func covers(_ topicOrPattern: String) -> Bool {
        if exact.contains(topicOrPattern) { return true }
        return prefixes.contains { topicOrPattern.hasPrefix($0) }
    }
}

/// A `--grant` template such as `user:{sub}:*`, made concrete for one token.
public struct GrantTemplate: Sendable, Equatable {
    public let template: String

    /// Fails on a template that could never yield a valid grant.
    public init?(_ template: String) {
        let probe = template.replacing("{sub}", with: "x")
        guard TopicName.isValidTopicOrPattern(probe) else { return nil }
        self.template = template
    }

    /// The grant for `sub`, or nil when `sub` would make it malformed
    /// (a `sub` holding `*` must not widen a grant).
    public func grant(forSubject sub: String) -> String? {
        let grant = template.replacing("{sub}", with: sub)
        if template.contains("{sub}"), sub.isEmpty || !sub.utf8.allSatisfy(TopicName.isTopicByte) { return nil }
        return TopicName.isValidTopicOrPattern(grant) ? grant : nil
    }
}
