using System.Globalization;
using System.Text;
using Microsoft.Extensions.Logging;
using UblkSharp.Runtime;

namespace UblkSharp.Cli.Logging;

/// <summary>
/// How a line reaches the systemd journal through stderr: systemd.exec(5) sets JOURNAL_STREAM to
/// "DEV:INO" of the stream it connected, and a line that starts with "&lt;N&gt;" is logged at syslog
/// priority N (sd-daemon(3)). The journal adds SYSLOG_IDENTIFIER (the unit's SyslogIdentifier=),
/// so the lines there carry no "ublksharp: " of their own.
/// </summary>
internal static class JournalFormat
{
    public const string Variable = "JOURNAL_STREAM";

    /// <summary>sd-daemon(3)'s SD_CRIT .. SD_DEBUG for a level.</summary>
    public static int Priority(LogLevel level) => level switch
    {
        LogLevel.Critical => 2,
        LogLevel.Error => 3,
        LogLevel.Warning => 4,
        LogLevel.Information => 6,
        _ => 7,
    };

    /// <summary>
    /// Whether <paramref name="journalStream"/> (JOURNAL_STREAM's value) names <paramref name="stderr"/>.
    /// A process whose stderr was redirected (a daemon's log file) inherits the variable but not the
    /// stream, so the identity must match, not the variable merely be set.
    /// </summary>
    public static bool Names(string? journalStream, FileIdentity? stderr)
    {
        if (stderr is not FileIdentity id || string.IsNullOrEmpty(journalStream))
        {
            return false;
        }
        var colon = journalStream.IndexOf(':', StringComparison.Ordinal);
        return colon > 0
            && ulong.TryParse(journalStream.AsSpan(0, colon), NumberStyles.None, CultureInfo.InvariantCulture, out var dev)
            && ulong.TryParse(journalStream.AsSpan(colon + 1), NumberStyles.None, CultureInfo.InvariantCulture, out var ino)
            && dev == id.Device && ino == id.Inode;
    }

    /// <summary>Whether this process's stderr is the journal's stream.</summary>
    public static bool StderrIsJournal() => Names(Environment.GetEnvironmentVariable(Variable), FileIdentity.OfDescriptor(2));

    /// <summary>
    /// <paramref name="text"/> as lines for stderr: for the journal, every line (a stack trace has
    /// many) with the level's priority, since the journal makes an entry of each line and one
    /// without a prefix would land at the default priority, out of place among the others;
    /// otherwise "ublksharp: " before the first line, as the CLI has always written.
    /// </summary>
    public static string Lines(LogLevel level, string text, bool journal)
    {
        var b = new StringBuilder(text.Length + 16);
        if (!journal)
        {
            b.Append("ublksharp: ").Append(text.TrimEnd('\n', '\r')).Append('\n');
            return b.ToString();
        }
        var prefix = string.Create(CultureInfo.InvariantCulture, $"<{Priority(level)}>");
        foreach (var line in text.TrimEnd('\n', '\r').Split('\n'))
        {
            b.Append(prefix).Append(line.TrimEnd('\r')).Append('\n');
        }
        return b.ToString();
    }
}
