using System.Globalization;

namespace UblkSharp.Targets;

/// <summary>Sizes as people write them: "4096", "512K", "64M", "10G", "1T" (binary units).</summary>
public static class ByteSize
{
    public static long Parse(string text)
    {
        if (TryParse(text, out var bytes))
        {
            return bytes;
        }
        throw new FormatException($"bad size '{text}': give a number of bytes with an optional K, M, G or T suffix, e.g. 512M");
    }

    public static bool TryParse(string? text, out long bytes)
    {
        bytes = 0;
        if (string.IsNullOrWhiteSpace(text))
        {
            return false;
        }
        var s = text.Trim();
        var shift = char.ToUpperInvariant(s[^1]) switch
        {
            'K' => 10,
            'M' => 20,
            'G' => 30,
            'T' => 40,
            _ => 0,
        };
        if (shift > 0)
        {
            s = s[..^1];
        }
        if (!long.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out var n) || n <= 0 || n > (long.MaxValue >> shift))
        {
            return false;
        }
        bytes = n << shift;
        return true;
    }

    public static string Format(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        var i = 0;
        var v = (double)bytes;
        while (v >= 1024 && i < units.Length - 1)
        {
            v /= 1024;
            i++;
        }
        return i == 0 ? $"{bytes} B" : v.ToString(v < 10 ? "0.##" : "0.#", CultureInfo.InvariantCulture) + " " + units[i];
    }
}
