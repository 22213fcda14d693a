using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

public class ByteSizeTests
{
    [Theory]
    [InlineData("4096", 4096L)]
    [InlineData("512K", 512L << 10)]
    [InlineData("512k", 512L << 10)]
    [InlineData("64M", 64L << 20)]
    [InlineData("10G", 10L << 30)]
    [InlineData("1T", 1L << 40)]
    [InlineData(" 1G ", 1L << 30)]
    [InlineData("8388607T", 8388607L << 40)]
    public void ParsesBinaryUnits(string text, long expected)
    {
        Assert.Equal(expected, ByteSize.Parse(text));
        Assert.True(ByteSize.TryParse(text, out var bytes));
        Assert.Equal(expected, bytes);
    }

    [Theory]
    [InlineData("")]
    [InlineData("   ")]
    [InlineData("12X")]
    [InlineData("0")]
    [InlineData("0K")]
    [InlineData("-1")]
    [InlineData("+1")]
    [InlineData("1.5G")]
    [InlineData("1,024")]
    [InlineData("G")]
    [InlineData("1GG")]
    [InlineData("1 G")]
    [InlineData("8388608T")]          // 2^63: one past long.MaxValue
    [InlineData("9223372036854775808")]
    [InlineData("99999999999999999999999K")]
    public void RejectsBadSizesWithAHumanMessage(string text)
    {
        Assert.False(ByteSize.TryParse(text, out var bytes));
        Assert.Equal(0, bytes);
        var e = Assert.Throws<FormatException>(() => ByteSize.Parse(text));
        Assert.StartsWith($"bad size '{text}': give a number of bytes", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain("(Parameter", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TryParseAcceptsNull()
    {
        Assert.False(ByteSize.TryParse(null, out var bytes));
        Assert.Equal(0, bytes);
    }

    [Fact]
    public void LargestSizeIsLongMaxRoundedToTheUnit()
    {
        Assert.Equal(long.MaxValue, ByteSize.Parse(long.MaxValue.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        Assert.Equal((long.MaxValue >> 10) << 10, ByteSize.Parse($"{long.MaxValue >> 10}K"));
        Assert.False(ByteSize.TryParse($"{(long.MaxValue >> 10) + 1}K", out _));
    }

    [Theory]
    [InlineData(0L, "0 B")]
    [InlineData(512L, "512 B")]
    [InlineData(1023L, "1023 B")]
    [InlineData(1024L, "1 KiB")]
    [InlineData(1536L, "1.5 KiB")]
    [InlineData(4096L, "4 KiB")]
    [InlineData(512L << 10, "512 KiB")]
    [InlineData(64L << 20, "64 MiB")]
    [InlineData(10L << 30, "10 GiB")]
    [InlineData((10L << 30) + (300L << 20), "10.3 GiB")]
    [InlineData(1L << 40, "1 TiB")]
    [InlineData(3L << 50, "3 PiB")]
    [InlineData(5000L << 50, "5000 PiB")]
    public void FormatsWithBinaryUnits(long bytes, string expected)
    {
        Assert.Equal(expected, ByteSize.Format(bytes));
    }

    [Theory]
    [InlineData("4096")]
    [InlineData("512K")]
    [InlineData("64M")]
    [InlineData("10G")]
    [InlineData("1T")]
    public void FormatOfAParsedSizeNamesTheSameAmount(string text)
    {
        var formatted = ByteSize.Format(ByteSize.Parse(text));
        var expected = text == "4096" ? "4 KiB" : text[..^1] + " " + text[^1] + "iB";
        Assert.Equal(expected, formatted);
    }
}
