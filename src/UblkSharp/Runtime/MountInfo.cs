using System.Text;

namespace UblkSharp.Runtime;

/// <summary>
/// One line of /proc/PID/mountinfo (proc(5)): "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3
/// /dev/root rw,errors=continue". The optional fields vary in number, so the file system type and
/// mount source are found after the " - " separator, not by position.
/// </summary>
internal readonly record struct MountInfo(string DevNumber, string Root, string MountPoint, string FsType, string Source)
{
    /// <summary>Parses a line; null when it does not have the shape proc(5) gives it.</summary>
    public static MountInfo? Parse(string line)
    {
        ArgumentNullException.ThrowIfNull(line);
        var fields = line.Split(' ');
        var separator = fields.Length < 10 ? -1 : Array.IndexOf(fields, "-", 6);
        if (separator < 0 || separator + 2 >= fields.Length)
        {
            return null;
        }
        return new MountInfo(fields[2], Unescape(fields[3]), Unescape(fields[4]), Unescape(fields[separator + 1]), Unescape(fields[separator + 2]));
    }

    /// <summary>
    /// Whether this mount is of the block device <paramref name="blockPath"/> (major:minor
    /// <paramref name="devNumber"/>). The device number alone misses btrfs, whose superblock has
    /// an anonymous st_dev (0:NN) whatever its devices are; the source misses a mount made through
    /// another name of the node (a /dev/disk/by-* link, which libmount usually resolves). Either
    /// matching is enough.
    /// </summary>
    public bool IsOf(string blockPath, string devNumber) =>
        DevNumber == devNumber || Source == blockPath;

    /// <summary>The kernel writes space, tab, newline and backslash in paths as octal escapes (\040).</summary>
    private static string Unescape(string field)
    {
        if (!field.Contains('\\', StringComparison.Ordinal))
        {
            return field;
        }
        var sb = new StringBuilder(field.Length);
        for (var i = 0; i < field.Length; i++)
        {
            if (field[i] == '\\' && i + 3 < field.Length && IsOctal(field[i + 1]) && IsOctal(field[i + 2]) && IsOctal(field[i + 3]))
            {
                sb.Append((char)(((field[i + 1] - '0') << 6) | ((field[i + 2] - '0') << 3) | (field[i + 3] - '0')));
                i += 3;
            }
            else
            {
                sb.Append(field[i]);
            }
        }
        return sb.ToString();
    }

    private static bool IsOctal(char c) => c is >= '0' and <= '7';
}
