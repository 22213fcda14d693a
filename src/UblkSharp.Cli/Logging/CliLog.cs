using Microsoft.Extensions.Logging;

namespace UblkSharp.Cli.Logging;

/// <summary>
/// The process's logger, set up from --log-level (or UBLKSHARP_LOG_LEVEL) before a command runs.
/// The library logs through <see cref="Factory"/>; the CLI's own diagnostics through the methods here.
/// </summary>
internal static class CliLog
{
    public const string Variable = "UBLKSHARP_LOG_LEVEL";

    /// <summary>The names --log-level takes, as they are written.</summary>
    public static IReadOnlyList<string> LevelNames => Names;

    // In LogLevel's order: Trace (0) to None (6).
    private static readonly string[] Names = ["trace", "debug", "information", "warning", "error", "critical", "none"];

    // Until Configure: what comes before it (a bad --log-level) goes to the journal in its format too.
    private static StderrLoggerProvider _provider = new(LogLevel.Information, JournalFormat.StderrIsJournal());
    private static ILogger _logger = _provider.CreateLogger("ublksharp");

    public static StderrLoggerProvider Provider => _provider;

    public static ILoggerFactory Factory => _provider;

    public static ILogger Logger => _logger;

    /// <summary>The level <paramref name="name"/> names (any case); false if it names none.</summary>
    public static bool TryParseLevel(string? name, out LogLevel level)
    {
        var i = name is null ? -1 : Array.FindIndex(Names, n => string.Equals(n, name, StringComparison.OrdinalIgnoreCase));
        level = i < 0 ? LogLevel.Information : (LogLevel)i;
        return i >= 0;
    }

    /// <summary>The name --log-level gives <paramref name="level"/>.</summary>
    public static string Name(LogLevel level) => Names[(int)level];

    /// <summary>
    /// Logs at <paramref name="level"/> from now on, in the journal's format if stderr is the
    /// journal's stream. The level goes into the environment too, so every process this one starts
    /// (a detached daemon, a supervisor's standby, an upgrade's new daemon) logs at it as well,
    /// whichever arguments it is given.
    /// </summary>
    public static void Configure(LogLevel level)
    {
        _provider = new StderrLoggerProvider(level, JournalFormat.StderrIsJournal());
        _logger = _provider.CreateLogger("ublksharp");
        Environment.SetEnvironmentVariable(Variable, Name(level));
    }

    public static void Information(string message) => Write(LogLevel.Information, message);

    public static void Warning(string message) => Write(LogLevel.Warning, message);

    public static void Error(string message) => Write(LogLevel.Error, message);

    /// <summary>What a command fails with: said whatever the level, since the exit code alone says too little.</summary>
    public static void Failure(string message) => _provider.Write(LogLevel.Error, message);

    private static void Write(LogLevel level, string message)
    {
        if (_provider.IsEnabled(level))
        {
            _provider.Write(level, message);
        }
    }
}
