namespace UblkSharp.Targets;

/// <summary>
/// The target's backing is held by another writer (a cow overlay's file lock, an rbd image's
/// exclusive lock): a second writer is refused. A standby daemon meets it while the daemon it will
/// replace still serves, and opens the target at the takeover instead.
/// </summary>
public class TargetLockedException(string message) : IOException(message);
